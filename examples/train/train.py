"""A small training loop that reports to Takeoff: the example job `make demo` launches."""

import math
import random
import time

from tqdm import tqdm

import takeoff

run = takeoff.init(config={"lr": 0.1, "epochs": 5, "seed": 0})
config = run.config
random.seed(config["seed"])
print(f"training with lr={config['lr']} for {config['epochs']} epochs")

weight, best = 5.0, math.inf
for epoch in tqdm(range(config["epochs"]), desc="epochs"):
    for step in range(20):
        gradient = 2 * weight + random.gauss(0, 0.1)
        weight -= config["lr"] * gradient
        loss = weight * weight
        run.log({"loss": loss, "weight": weight, "epoch": epoch}, step=epoch * 20 + step)
        time.sleep(0.002)
    best = min(best, loss)
    print(f"epoch {epoch}: loss {loss:.5f}")

run.summary["best_loss"] = best
run.finish()

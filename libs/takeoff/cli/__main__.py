from takeoff.cli import main

main()

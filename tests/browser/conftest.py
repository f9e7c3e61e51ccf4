"""A real headless Chromium, driven by Selenium through Debian's chromedriver (``TAKEOFF_TEST_CHROMIUM``,
``TAKEOFF_TEST_CHROMEDRIVER``, set by .ci/browser-setup.sh): the `browser` marker's component.

The browser keeps no state between runs (a fresh profile in a temporary directory) and reaches nothing but
loopback: no sync, no component updates, no background requests (console_stack.CHROMIUM_FLAGS).
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from selenium.webdriver.remote.webdriver import WebDriver

from tests.browser.console_stack import chromium_paths, start_chromium
from tests.conftest import require


@pytest.fixture(scope="module")
def browser(tmp_path_factory: pytest.TempPathFactory) -> Iterator[WebDriver]:
    """One headless Chromium for a test module (its pages share the signed-in session)."""
    paths = chromium_paths()
    require(
        "Chromium and chromedriver",
        paths is not None,
        "run .ci/browser-setup.sh (Debian's chromium and chromium-driver), or set TAKEOFF_TEST_CHROMIUM and "
        "TAKEOFF_TEST_CHROMEDRIVER",
    )
    assert paths is not None
    driver = start_chromium(*paths, tmp_path_factory.mktemp("chromium-profile"))
    try:
        yield driver
    finally:
        driver.quit()

"""The sliders of chapters 07-09 in a real browser, as ``test_browser.py`` drives those of the
earlier chapters (a module of its own, so that the two can run on two workers)."""
import pytest
from test_browser import LATER, browser, lab, use_the_slider  # noqa: F401 (the fixtures)


@pytest.mark.parametrize("name", LATER)
def test_slider_in_the_browser(lab, browser, name):  # noqa: F811
    use_the_slider(lab, browser, name)

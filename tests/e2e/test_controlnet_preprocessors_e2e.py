"""The real `webuiapi` client's ControlNet preprocessor calls against a real `easel serve` subprocess."""

from __future__ import annotations

import numpy as np
import pytest
import webuiapi
from PIL import Image, ImageDraw

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def api(live_server) -> webuiapi.WebUIApi:
    return webuiapi.WebUIApi(host="127.0.0.1", port=live_server.port)


def test_webuiapi_lists_and_runs_preprocessors(api: webuiapi.WebUIApi) -> None:
    modules = api.controlnet_module_list()
    assert modules[0] == "none" and "canny" in modules and "depth" not in modules  # no depth model installed
    square = Image.new("RGB", (64, 64), "white")
    ImageDraw.Draw(square).rectangle((16, 16, 47, 47), fill="black")
    # webuiapi sends `controlnet_images` (and thresholds 64/64 unless told)
    answer = api.controlnet_detect([square], module="canny", processor_res=64, threshold_a=100, threshold_b=200)
    assert answer.info == "Success" and len(answer.images) == 1
    edges = np.asarray(answer.images[0].convert("L"))
    assert edges.shape == (64, 64)
    assert edges[16:48, 14:18].max() == 255 and edges[24:40, 24:40].max() == 0  # the left side, not the inside

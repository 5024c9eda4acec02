"""What the Ray ingress and workers send each other (server/ray_serve/protocol.py), without Ray: engine errors come
back as the same classes with the same HTTP mapping, and requests and results survive pickling (Ray pickles them)
with their images intact."""

from __future__ import annotations

import pickle

import pytest
from PIL import Image

from pipelines.engine_api import JobStatus
from pipelines.errors import (
    DeadlineExceeded,
    EngineDead,
    EngineNotReady,
    GenerationFailed,
    InsufficientMemory,
    InvalidRequest,
    JobCancelled,
    ModelLoadError,
    ModelNotFound,
    QueueFull,
)
from pipelines.hires import HiresOptions
from pipelines.request import GenerationRequest, GenerationResult, InpaintOptions, LoraRef, Progress, Task
from server.errors import error_info
from server.ray_serve import protocol


@pytest.mark.parametrize(
    "error",
    [
        InvalidRequest("width", "must be a positive multiple of 8"),
        ModelNotFound("no-such-model"),
        QueueFull(7),
        EngineNotReady("the server is shutting down"),
        EngineDead("the engine stopped: device fault"),
        ModelLoadError("model 'x' failed to load"),
        JobCancelled("job 1 was cancelled"),
        DeadlineExceeded("the request passed its deadline"),
        InsufficientMemory("out of GPU memory"),
        GenerationFailed("generation failed: boom"),
    ],
    ids=lambda e: type(e).__name__,
)
def test_engine_errors_come_back_as_themselves(error: Exception):
    wire = pickle.loads(pickle.dumps(protocol.encode_error(error)))
    back = protocol.decode_error(wire)
    assert type(back) is type(error) and str(back) == str(error)
    original, decoded = error_info(error), error_info(back)
    assert (decoded.status, decoded.code, decoded.field) == (original.status, original.code, original.field)
    if isinstance(error, InvalidRequest):
        assert (back.field, back.message) == (error.field, error.message)
    if isinstance(error, QueueFull):
        assert back.retry_after_s == 7


def test_unknown_errors_become_generation_failed():
    back = protocol.decode_error(protocol.encode_error(ZeroDivisionError("division by zero")))
    assert isinstance(back, GenerationFailed) and "division by zero" in str(back)
    assert error_info(back).status == 500


def test_requests_and_results_pickle_with_their_images():
    image = Image.new("RGB", (16, 8), (10, 20, 30))
    mask = Image.new("L", (16, 8), 255)
    request = GenerationRequest(
        model="demo-sd15",
        prompt="a cat <lora:ink:0.5>",
        task=Task.INPAINT,
        init_images=[image],
        mask=mask,
        inpaint=InpaintOptions(mask_blur=2, full_res=False),
        loras=[LoraRef("ink", 0.5)],
        hires=HiresOptions(scale=1.5),
        seed=42,
        deadline=1.5e9,
        tags={"dialect": "a1111"},
    )
    back = pickle.loads(pickle.dumps(request))
    assert back.init_images[0].tobytes() == image.tobytes() and back.mask.tobytes() == mask.tobytes()
    assert (back.task, back.inpaint, back.loras, back.hires, back.deadline) == (
        Task.INPAINT,
        request.inpaint,
        request.loras,
        request.hires,
        1.5e9,
    )

    result = GenerationResult([image], [42], "demo-sd15", None, "Euler", "Automatic", 16, 8, 2)
    message = pickle.loads(pickle.dumps(protocol.finished(JobStatus.COMPLETED, result, None)))
    assert message["kind"] == protocol.FINISHED and message["error"] is None
    assert message["result"].images[0].tobytes() == image.tobytes() and message["result"].seeds == [42]

    update = pickle.loads(pickle.dumps(protocol.progress(JobStatus.RUNNING, Progress(1, 2, 3, 4, 5.0))))
    assert protocol.progress_of(update) == Progress(1, 2, 3, 4, 5.0) and update["status"] == "running"

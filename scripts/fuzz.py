#!/usr/bin/env python
"""Fuzz every operation of Easel's OpenAPI schema (all dialects) against a live server: no request may get a 5xx.

Schemathesis reads /openapi.json from the server and Hypothesis generates requests for each operation, in four
modes, sent one at a time:

- positive: requests that fit the schema. The schema does not carry the server's limits (max steps, sizes), so most
  generation requests among them are refused with 4xx: this exercises the limit checks;
- cheap: positive requests whose cost fields (steps, width/height, `size`, image counts, hires sizes) are then
  pinned small (CHEAP_FIELDS; an enum field gets its smallest number or `auto`) and whose image fields get a small
  decodable PNG, so they pass the limits and reach the engine with every other field random: samplers, styles,
  output formats, seeds, hires and inpaint options, async, masks, reference images...;
- negative: requests that violate the schema (wrong types, missing fields, invalid JSON): every one must be a 4xx;
- hostile: cheap requests (JSON bodies) with one field set to a value that fits the schema's type but is at the edge
  of what later steps can handle (HOSTILE_STRINGS: lone UTF-16 surrogates, NUL, bidi overrides; HOSTILE_NUMBERS:
  the 64-bit limits and beyond, -1, 0, tiny fractions), and the image counts raised to the limit so seed + i
  overflows show. Hypothesis rarely draws such values by itself; each one found a 500 once (issue #14).

A finding is:

- a 5xx answer, except the deliberate ones in EXPECTED_5XX (each with its reason). A 500 is always a bug. 503 and
  504 count too: the fuzz sends one request at a time to a server with generous timeouts, so neither a full queue
  nor a deadline can legitimately be hit;
- a transport failure (connection dropped, no answer within --timeout): a crashed or hung handler;
- a server that is no longer live and ready after the fuzz.

The server this script starts (default, fuzz_env()) has tight limits: at most 2 steps, 512x512 pixels (--max-side)
and 2 images per request, so generation is cheap on CPU with the demo models. Consequence: Genrex's sizes (1024 px and
up, `auto` included) and the fixed 1024+ sizes of gpt-image are refused with 4xx there; their generation runs with
--max-side 1536 (slower), and the end-to-end tests cover them. No operation is excluded.

Requests that the HTTP client itself cannot send (e.g. a generated header value with a newline) are counted as
`unsendable`, not as findings: they never reached the server.

Prints a per-operation summary and every finding with a curl command that reproduces it; exits 1 on any finding,
and on any operation Schemathesis could not generate requests for (it would go unfuzzed).
tests/e2e/test_fuzz_openapi.py runs the same fuzz with fewer examples.
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import re
import sys
import time
import zlib
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx
import hypothesis
import requests
import schemathesis
from hypothesis import HealthCheck, Phase
from PIL import Image
from schemathesis import GenerationMode

sys.path.insert(0, str(Path(__file__).resolve().parent))  # local_server.py next to this script
from local_server import DEFAULT_DEMO_MODELS, is_loopback_url, local_server  # noqa: E402


def fuzz_env(max_side: int = 512) -> dict[str, str]:
    """Tight limits: out-of-range values are refused (4xx) and in-range generation is cheap. The timeouts are
    generous for one request at a time on 2 CPU cores, so a 503/504 under the fuzz means something hung."""
    return {
        "EASEL_MAX_STEPS": "2",
        "EASEL_MAX_WIDTH": str(max_side),
        "EASEL_MAX_HEIGHT": str(max_side),
        "EASEL_MAX_OUTPUT_PIXELS": str(max_side * max_side),
        "EASEL_MAX_IMAGES_PER_REQUEST": "2",
        "EASEL_SYNC_TIMEOUT_S": "60",
        "EASEL_REQUEST_TIMEOUT_S": "90",
        "EASEL_CACHE_MAX_MODELS": "5",  # every demo model stays loaded: no reload churn between dialects
        # Fuzzed URLs (qwen edit `image`, `webhook_url`) must not keep the server busy on a network that is not there.
        "EASEL_FETCH_TIMEOUT_S": "3",
        "EASEL_WEBHOOK_TIMEOUT_S": "2",
        "EASEL_WEBHOOK_MAX_ATTEMPTS": "1",
        # gemini-3 4K would resize to 4096^2 and encode a ~30 MB PNG per request (seconds of CPU): tests/api cover it.
        "EASEL_GEMINI_4K_UPSCALE": "false",
    }


FUZZ_ENV = fuzz_env()
MODES = {
    "positive": GenerationMode.POSITIVE,
    "cheap": GenerationMode.POSITIVE,
    "negative": GenerationMode.NEGATIVE,
    "hostile": GenerationMode.POSITIVE,
}
# hostile mode: values that fit a string / number field's type but break code that assumes "normal" input.
HOSTILE_STRINGS = ("\ud800", "a \udfff b", "\udc80\ud800", "nul \x00 byte", "\u202e\u2066bidi", "\U0001f98a fox")
HOSTILE_NUMBERS: tuple[int | float, ...] = (2**63 - 1, 2**63 - 2, 2**63, -(2**63), 2**64, 10**30, -1, 0, 1e-9, 1e308)
HOSTILE_COUNTS = ("n_iter", "n", "num_images", "batch_size")  # the first one a body has is raised to 2 (the limit)
# cheap mode: body fields set to these values when the operation's body schema has them as a free integer / number
# / string; an enum field gets its smallest number or `auto` instead, so the request still fits the schema.
CHEAP_FIELDS: dict[str, object] = {
    "steps": 1,
    "hr_second_pass_steps": 1,
    "width": 64,
    "height": 64,
    "size": "64x64",
    "batch_size": 1,
    "n_iter": 1,
    "n": 1,
    "hr_scale": 1.0,
    "hr_resize_x": 0,
    "hr_resize_y": 0,
    "firstphase_width": 0,
    "firstphase_height": 0,
}
# 5xx answers that are the designed behaviour, by path (with or without the gateway's /v2/automatic1111 prefix).
# Anything else >= 500 is a finding.
EXPECTED_5XX: dict[tuple[str, str], tuple[int, str]] = {
    ("POST", "/sdapi/v1/interrogate"): (501, "A1111 interrogate's captioners (clip, deepdanbooru) are not installed"),
}
A1111_GATEWAY_PREFIX = "/v2/automatic1111"
# The requests library refuses to send these: the server never saw the request.
UNSENDABLE = (
    requests.exceptions.InvalidHeader,
    requests.exceptions.InvalidURL,
    requests.exceptions.InvalidSchema,
    requests.exceptions.MissingSchema,
    UnicodeEncodeError,
)


@dataclass
class Finding:
    operation: str
    mode: str
    status: int | None  # None: transport failure
    detail: str  # response body excerpt or the transport error
    curl: str


@dataclass
class OperationResult:
    operation: str
    statuses: Counter[int] = field(default_factory=Counter)
    unsendable: int = 0
    no_negative_data: bool = False
    generation_errors: list[str] = field(default_factory=list)  # Schemathesis/Hypothesis failed to generate data
    findings: list[Finding] = field(default_factory=list)

    @property
    def calls(self) -> int:
        return sum(self.statuses.values()) + sum(1 for f in self.findings if f.status is None)


@dataclass
class FuzzReport:
    base_url: str
    max_examples: int
    seed: int
    modes: list[str]
    seconds: float = 0.0
    operations: list[OperationResult] = field(default_factory=list)
    health_after: dict[str, int | str] = field(default_factory=dict)

    @property
    def findings(self) -> list[Finding]:
        found = [f for op in self.operations for f in op.findings]
        for probe, status in self.health_after.items():
            if status != 200:
                found.append(Finding(probe, "after fuzz", status if isinstance(status, int) else None, str(status), ""))
        return found

    def to_json(self) -> dict[str, Any]:
        operations = [{**asdict(op), "statuses": dict(op.statuses)} for op in self.operations]  # asdict breaks Counter
        data = {k: v for k, v in vars(self).items() if k != "operations"}
        return {**data, "operations": operations, "findings": [asdict(f) for f in self.findings]}

    def status_classes(self) -> Counter[str]:
        classes: Counter[str] = Counter()
        for op in self.operations:
            for status, n in op.statuses.items():
                classes[f"{status // 100}xx"] += n
            classes["unsendable"] += op.unsendable
            classes["transport errors"] += sum(1 for f in op.findings if f.status is None)
        return classes


def case_seed(seed: int, label: str, mode: str) -> int:
    """A stable per-operation seed (crc32, not hash(): that changes between processes)."""
    return zlib.crc32(f"{seed}:{label}:{mode}".encode())


def expected_5xx(label: str) -> int | None:
    """The 5xx status `label` ("POST /sdapi/v1/interrogate") answers by design, if any."""
    method, _, path = label.partition(" ")
    path = path.removeprefix(A1111_GATEWAY_PREFIX) if path.startswith(A1111_GATEWAY_PREFIX + "/") else path
    expected = EXPECTED_5XX.get((method, path))
    return expected[0] if expected else None


@dataclass
class BodySchema:
    media_type: str | None = None  # application/json or multipart/form-data; None: the operation takes no body
    properties: dict[str, dict[str, Any]] = field(default_factory=dict)  # top-level fields, $refs resolved
    required: set[str] = field(default_factory=set)


def body_schema(spec: dict[str, Any], method: str, path: str) -> BodySchema:
    def resolve(node: dict[str, Any]) -> dict[str, Any]:
        while "$ref" in node:
            node = spec["components"]["schemas"][node["$ref"].rsplit("/", 1)[-1]]
        return node

    content = spec["paths"][path][method.lower()].get("requestBody", {}).get("content", {})
    for media_type in ("application/json", "multipart/form-data"):
        if media_type in content:
            schema = resolve(content[media_type]["schema"])
            properties = {k: resolve(v) for k, v in schema.get("properties", {}).items()}
            return BodySchema(media_type, properties, set(schema.get("required", [])))
    return BodySchema()


def png(size: tuple[int, int], mode: str, fill: Any, box_fill: Any) -> bytes:
    """A small PNG with a different centre box: an image, or a mask whose box marks the area to change."""
    image = Image.new(mode, size, fill)
    w, h = size
    image.paste(box_fill, (w // 4, h // 4, 3 * w // 4, 3 * h // 4))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


# cheap mode: input images that decode. Random bytes never do, so without these the img2img, inpaint, edit and
# reference-image paths would only ever see refusals. 80x64: not the pinned output size, so resizing runs too.
SOURCE_PNG = png((80, 64), "RGB", (200, 40, 40), (40, 40, 200))
MASK_PNG = png((80, 64), "L", 0, 255)  # white = the area to change (A1111, gpt-image)
ALPHA_MASK_PNG = png((80, 64), "RGBA", (0, 0, 0, 255), (0, 0, 0, 0))  # transparent = the area to change (OpenAI)
IMAGE_FIELDS = ("image", "init_images", "mask", "input_image", "input_image_2", "input_image_3", "input_image_4")


def image_value(name: str, schema: dict[str, Any], media_type: str) -> object | None:
    """A decodable image for an image field, shaped as its schema wants (base64 or a file part, one or a list)."""
    alternatives = schema.get("anyOf", [schema])
    is_list = any(a.get("type") == "array" for a in alternatives)
    if media_type == "multipart/form-data":
        data: object = ALPHA_MASK_PNG if name == "mask" else SOURCE_PNG
    elif any(a.get("type") == "string" or (a.get("type") == "array") for a in alternatives):
        data = base64.b64encode(MASK_PNG if name == "mask" else SOURCE_PNG).decode()
    else:
        return None
    return [data] if is_list else data


@dataclass
class CheapPins:
    always: dict[str, object] = field(default_factory=dict)  # set in every cheap request
    if_sent: dict[str, object] = field(default_factory=dict)  # replace the value when the request has one

    def __bool__(self) -> bool:
        return bool(self.always or self.if_sent)

    def apply(self, case: schemathesis.Case) -> schemathesis.Case:
        if isinstance(case.body, dict):
            case.body.update(self.always)
            case.body.update({k: v for k, v in self.if_sent.items() if case.body.get(k) is not None})
        return case


def cheap_pins(body: BodySchema) -> CheapPins:
    """The CHEAP_FIELDS the body has (for an enum: its smallest number or `auto`), and its image fields."""
    wanted = {int: {"integer", "number"}, float: {"number"}, str: {"string"}}
    pins = CheapPins()
    for name, value in CHEAP_FIELDS.items():
        schema = body.properties.get(name)
        if schema is None:
            continue
        alternatives = schema.get("anyOf", [schema])
        members = [m for a in alternatives for m in a.get("enum", [])]
        if members:  # a fixed choice (GenPicz widths, gpt-image sizes): its smallest number, or `auto`
            numbers = [m for m in members if isinstance(m, int | float) and not isinstance(m, bool)]
            if isinstance(value, int | float) and numbers:
                pins.always[name] = min(numbers)
            elif "auto" in members:
                pins.always[name] = "auto"
        elif {a.get("type") for a in alternatives} & wanted[type(value)]:
            pins.always[name] = value
    for name in IMAGE_FIELDS:
        if name in body.properties and body.media_type:
            value = image_value(name, body.properties[name], body.media_type)
            if value is not None:
                # Always where the dialect needs it (even if the schema says optional, as A1111's init_images).
                (pins.always if name in body.required or name == "init_images" else pins.if_sent)[name] = value
    return pins


@dataclass
class HostileFields:
    strings: list[str] = field(default_factory=list)  # top-level string fields of a JSON body
    numbers: list[str] = field(default_factory=list)  # top-level integer / number fields
    counts: list[str] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.strings or self.numbers)

    def strategy(self, cases: Any) -> Any:
        """One field of each case set to a hostile value of its type; the image counts at 2."""
        from hypothesis import strategies as st

        choices = [(n, v) for n in self.strings for v in HOSTILE_STRINGS]
        choices += [(n, v) for n in self.numbers for v in HOSTILE_NUMBERS]

        def mutate(pair: tuple[schemathesis.Case, tuple[str, object]]) -> schemathesis.Case:
            case, (name, value) = pair
            if isinstance(case.body, dict):
                if self.counts:  # one count only: two at 2 would pass the limit and be refused
                    case.body[self.counts[0]] = 2
                case.body[name] = value
            return case

        return st.tuples(cases, st.sampled_from(choices)).map(mutate)


def hostile_fields(body: BodySchema) -> HostileFields:
    """The JSON body's top-level fields that take a string or a number (multipart cannot carry surrogates)."""
    fields = HostileFields()
    if body.media_type != "application/json":
        return fields
    for name, schema in body.properties.items():
        types = {a.get("type") for a in schema.get("anyOf", [schema])}
        if any(a.get("enum") for a in schema.get("anyOf", [schema])) or name in IMAGE_FIELDS:
            continue  # fixed choices are refused as such; images are pinned to ones that decode
        if "string" in types:
            fields.strings.append(name)
        if types & {"integer", "number"}:
            fields.numbers.append(name)
        if name in HOSTILE_COUNTS and types & {"integer", "number"}:
            fields.counts.append(name)
    return fields


def fuzz_operation(
    operation: Any,
    base_url: str,
    session: requests.Session,
    *,
    cheap: CheapPins,
    hostile: HostileFields | None = None,
    modes: list[str],
    max_examples: int,
    mode_examples: dict[str, int] | None = None,
    seed: int,
    timeout_s: float,
) -> OperationResult:
    result = OperationResult(operation.label)
    allowed_5xx = expected_5xx(operation.label)

    def sender(mode: str) -> Any:
        def send(case: schemathesis.Case) -> None:
            try:
                response = case.call(base_url=base_url, session=session, timeout=timeout_s)
            except UNSENDABLE:
                result.unsendable += 1
                return
            except requests.RequestException as e:  # dropped connection, timeout: the server failed to answer
                detail = f"{type(e).__name__}: {e}"[:500]
                result.findings.append(Finding(operation.label, mode, None, detail, case.as_curl_command()))
                return
            status = response.status_code
            result.statuses[status] += 1
            if status >= 500 and status != allowed_5xx:
                body = response.content[:800].decode("utf-8", "replace")
                result.findings.append(Finding(operation.label, mode, status, body, case.as_curl_command()))

        return send

    for mode in modes:
        strategy = operation.as_strategy(generation_mode=MODES[mode])
        if mode == "cheap":
            if not cheap:
                continue  # nothing to pin: the same requests as positive
            strategy = strategy.map(cheap.apply)
        if mode == "hostile":
            if not hostile:
                continue  # no JSON string or number field to set
            strategy = hostile.strategy(strategy.map(cheap.apply))
        test = hypothesis.given(case=strategy)(sender(mode))
        test = hypothesis.seed(case_seed(seed, operation.label, mode))(test)
        test = hypothesis.settings(
            max_examples=(mode_examples or {}).get(mode, max_examples),
            deadline=None,
            database=None,  # reproducible from the seed alone, nothing replayed from earlier runs
            phases=[Phase.generate],  # send() never raises: nothing to shrink
            suppress_health_check=list(HealthCheck),
            verbosity=hypothesis.Verbosity.quiet,
            print_blob=False,
        )(test)
        try:
            test()
        except hypothesis.errors.Unsatisfiable:
            if mode != "negative":
                raise  # every operation has valid requests
            result.no_negative_data = True  # nothing to violate: the operation has no parameters or body
        except Exception as e:
            first_line = str(e).splitlines()[0][:200] if str(e) else ""
            result.generation_errors.append(f"{mode}: {type(e).__name__}: {first_line}")
    return result


def run_fuzz(
    base_url: str,
    *,
    max_examples: int = 5,
    seed: int = 0,
    modes: list[str] | None = None,
    include: str | None = None,
    timeout_s: float = 120.0,
    progress: bool = False,
    mode_examples: dict[str, int] | None = None,
) -> FuzzReport:
    """Fuzz every operation of the server's schema (those whose label matches `include`, a regex, if given).
    `mode_examples` caps the examples of some modes below `max_examples` (a bounded test run)."""
    modes = modes or list(MODES)
    report = FuzzReport(base_url, max_examples, seed, modes)
    spec = httpx.get(f"{base_url}/openapi.json", timeout=30).raise_for_status().json()
    schema = schemathesis.openapi.from_dict(spec)
    started = time.monotonic()
    with requests.Session() as session:
        for item in schema.get_all_operations():
            operation = item.ok()  # an operation the schema cannot describe is an error here, not a skip
            if include and not re.search(include, operation.label):
                continue
            t0 = time.monotonic()
            body = body_schema(spec, operation.method, operation.path)
            result = fuzz_operation(
                operation,
                base_url,
                session,
                cheap=cheap_pins(body),
                hostile=hostile_fields(body),
                modes=modes,
                max_examples=max_examples,
                mode_examples=mode_examples,
                seed=seed,
                timeout_s=timeout_s,
            )
            report.operations.append(result)
            if progress:
                statuses = " ".join(f"{s}x{n}" for s, n in sorted(result.statuses.items()))
                flag = f"  FINDINGS: {len(result.findings)}" if result.findings else ""
                print(f"{time.monotonic() - t0:6.1f}s {operation.label:<60} {statuses}{flag}", flush=True)
    for probe in ("/livez", "/readyz"):
        try:
            report.health_after[probe] = httpx.get(f"{base_url}{probe}", timeout=10).status_code
        except httpx.HTTPError as e:
            report.health_after[probe] = f"{type(e).__name__}: {e}"
    report.seconds = time.monotonic() - started
    return report


def format_report(report: FuzzReport) -> str:
    lines = [
        f"fuzzed {len(report.operations)} operations of {report.base_url} in {report.seconds:.0f} s "
        f"(modes {','.join(report.modes)}, max {report.max_examples} examples per operation and mode, "
        f"seed {report.seed})",
    ]
    total = sum(op.calls for op in report.operations)
    classes = report.status_classes()
    lines.append(f"requests: {total}  " + "  ".join(f"{k}: {v}" for k, v in sorted(classes.items()) if v))
    no_negative = sum(1 for op in report.operations if op.no_negative_data)
    if no_negative and "negative" in report.modes:
        lines.append(f"operations without parameters or body (no negative data possible): {no_negative}")
    errors = [f"{op.operation} ({e})" for op in report.operations for e in op.generation_errors]
    if errors:
        lines.append(f"data generation failed for {len(errors)} operation/mode pairs:")
        lines += [f"  {x}" for x in errors]
    lines.append("health after the fuzz: " + ", ".join(f"{k} {v}" for k, v in report.health_after.items()))
    findings = report.findings
    lines.append(f"findings: {len(findings)}")
    for f in findings:
        lines += [f"- {f.operation} [{f.mode}] -> {f.status or 'no answer'}: {f.detail}", f"  {f.curl}"]
    return "\n".join(lines)


def server_tracebacks(log: Path, limit: int = 3) -> list[str]:
    """The first few tracebacks the server logged: the root cause of a 5xx finding."""
    text = log.read_text(errors="replace") if log.exists() else ""
    blocks = re.findall(r"Traceback \(most recent call last\):\n(?:[ \t].*\n)+.*", text)
    return blocks[:limit]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--url", help="fuzz this running loopback server (default: start one with tight limits)")
    p.add_argument("--max-examples", type=int, default=25, help="per operation and mode")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--modes", default=",".join(MODES), help="positive, cheap, negative, hostile (comma-separated)")
    p.add_argument("--include", help="only operations whose label (e.g. 'POST /v1/generate') matches this regex")
    p.add_argument("--timeout", type=float, default=120.0, help="seconds to wait for each answer")
    p.add_argument(
        "--max-side",
        type=int,
        default=512,
        help="own server: max width/height (1536 also generates Genrex's fixed sizes; slower)",
    )
    p.add_argument("--demo-models", type=Path, default=DEFAULT_DEMO_MODELS, help="shared demo-models folder")
    p.add_argument("--json-out", type=Path, help="write the report here as JSON")
    args = p.parse_args(argv)
    args.modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    if unknown := set(args.modes) - set(MODES):
        p.error(f"unknown mode(s): {', '.join(sorted(unknown))}")
    if args.url and not is_loopback_url(args.url):
        p.error(f"--url must be a loopback server (127.0.0.1, ::1, localhost), not {args.url}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    kwargs = dict(max_examples=args.max_examples, seed=args.seed, modes=args.modes, include=args.include)
    if args.url:
        report = run_fuzz(args.url.rstrip("/"), timeout_s=args.timeout, progress=True, **kwargs)
        tracebacks: list[str] = []
    else:
        env = fuzz_env(args.max_side)
        with local_server(env, demo_models=args.demo_models) as server:
            print(f"easel serve on {server.url} with {json.dumps(env)}", flush=True)
            report = run_fuzz(server.url, timeout_s=args.timeout, progress=True, **kwargs)
            tracebacks = server_tracebacks(server.log)
    print(format_report(report))
    for tb in tracebacks:
        print("server traceback:\n" + tb)
    if args.json_out:
        args.json_out.write_text(json.dumps(report.to_json(), indent=2))
    unfuzzed = [e for op in report.operations for e in op.generation_errors]
    return 1 if report.findings or unfuzzed else 0


if __name__ == "__main__":
    sys.exit(main())

"""The Serve application over real HTTP on the 2-node test cluster: the API, score parity with predict and
evaluate, every kind of bad input, the API key, overload, and a killed replica."""

from __future__ import annotations

import base64
import io
import json
import os
import shutil
import signal
import socket
import struct
import threading
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
import requests
from PIL import Image
from servers import free_port

from rayad.artifact import Predictor
from rayad.evaluate import evaluate
from rayad.predict import predict_paths
from rayad.serve import ServeSettings, discover_models, start

pytestmark = pytest.mark.slow

KEY = {"X-API-Key": "secret"}
GRASS_MAX_PIXELS = 20_000  # the served "grass" model's data.max_pixels: its images are 128² (16,384 pixels)


@pytest.fixture(scope="module")
def server(ray_cluster, trained_run, tmp_path_factory):
    from ray import serve

    models = tmp_path_factory.mktemp("models")
    shutil.copytree(trained_run, models / "brick")
    shutil.copytree(trained_run, models / "grass")
    meta = json.loads((models / "grass" / "model.json").read_text())
    meta["config"]["data"]["max_pixels"] = GRASS_MAX_PIXELS  # under the server's --max-pixels
    (models / "grass" / "model.json").write_text(json.dumps(meta))
    settings = ServeSettings(models=discover_models(models), max_batch_size=4, batch_wait_s=0.02,
                             max_queued_requests=2, replica_cpus=0.5, max_upload_mb=0.25, max_pixels=1_000_000,
                             max_batch_images=8, api_key="secret")
    url = start(settings, port=free_port())
    yield url
    serve.shutdown()


def _png(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def _png_header(width: int, height: int) -> bytes:
    """A PNG that only declares its size: Pillow refuses it at open when the size is over its own limit."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b"")


def test_health_and_models(server):
    assert requests.get(f"{server}/healthz").json() == {"status": "ok"}
    assert requests.get(f"{server}/readyz", timeout=60).json()["models"] == ["brick", "grass"]
    models = requests.get(f"{server}/v1/models", headers=KEY).json()["models"]
    assert [m["name"] for m in models] == ["brick", "grass"]
    assert [m["category"] for m in models] == ["brick", "brick"]  # "grass" serves a copy of the brick model
    assert models[0]["image_size"] == 32 and models[0]["threshold"] > 0 and len(models[0]["version"]) == 12


def test_served_score_equals_predict_and_evaluate(server, trained_run, demo_root):
    files = sorted((demo_root / "brick" / "test").rglob("*.png"))[:6]
    plain = {r["path"]: r for r in predict_paths(trained_run, files).to_pylist()}
    predictor = Predictor.load(trained_run)
    evaluated = evaluate(predictor, demo_root, "brick")
    by_path = dict(zip(evaluated["paths"], evaluated["scores"], strict=True))
    normalized_tolerance = 1e-6 / predictor.metadata["normalization"]["score_std"]  # the score's, in std units
    for path in files:
        raw = requests.post(f"{server}/v1/predict?model=brick", data=path.read_bytes(), headers=KEY).json()
        upload = requests.post(f"{server}/v1/predict?model=grass", headers=KEY,
                               files={"file": (path.name, path.read_bytes(), "image/png")}).json()
        assert raw["score"] == pytest.approx(plain[str(path)]["score"], abs=1e-6)
        assert raw["score"] == pytest.approx(by_path[str(path)], abs=1e-6)
        assert upload["score"] == pytest.approx(raw["score"], abs=1e-6)
        assert raw["label"] == plain[str(path)]["label"] and raw["model"] == "brick"
        assert raw["normalized_score"] == pytest.approx(plain[str(path)]["normalized_score"], abs=normalized_tolerance)


def test_a_model_refuses_over_its_own_pixel_limit_as_predict_does(server):
    limits = {m["name"]: m["max_pixels"] for m in requests.get(f"{server}/v1/models", headers=KEY).json()["models"]}
    assert limits == {"brick": 64_000_000, "grass": GRASS_MAX_PIXELS}
    image = _png(np.zeros((150, 150, 3), np.uint8))  # 22,500 pixels: under the server's 1,000,000
    assert requests.post(f"{server}/v1/predict?model=brick", data=image, headers=KEY).status_code == 200
    refused = requests.post(f"{server}/v1/predict?model=grass", data=image, headers=KEY)
    assert refused.status_code == 413 and "over the limit of 20,000" in refused.json()["error"]


def test_heatmap_and_mask(server, trained_run, demo_root):
    path = next((demo_root / "brick" / "test" / "hole").glob("*.png"))
    out = requests.post(f"{server}/v1/predict?model=brick&heatmap=true", data=path.read_bytes(), headers=KEY).json()
    heatmap = Image.open(io.BytesIO(base64.b64decode(out["heatmap_png"])))
    mask = np.asarray(Image.open(io.BytesIO(base64.b64decode(out["mask_png"]))))
    assert heatmap.size == (32, 32) and heatmap.mode == "RGB" and set(np.unique(mask)) <= {0, 255}
    expected = Predictor.load(trained_run).predict_files([path])[0]
    assert out["pixel_threshold"] == pytest.approx(expected.pixel_threshold)
    np.testing.assert_array_equal(mask > 0, expected.masks()[0])  # the map over the pixel threshold


def test_batch_with_a_bad_image(server, demo_root):
    paths = sorted((demo_root / "brick" / "test" / "good").glob("*.png"))[:2]
    files = [("files", (p.name, p.read_bytes(), "image/png")) for p in paths]
    files.append(("files", ("bad.png", b"not an image", "image/png")))
    out = requests.post(f"{server}/v1/predict/batch?model=brick", files=files, headers=KEY).json()
    results = out["results"]
    assert [r["file"] for r in results] == [paths[0].name, paths[1].name, "bad.png"]
    assert all("score" in r for r in results[:2])
    assert results[2]["status"] == 400 and "not a readable image" in results[2]["error"]
    assert "<_io." not in results[2]["error"] and "object at 0x" not in results[2]["error"]


def test_a_batch_larger_than_the_queue_is_scored_whole_and_one_over_the_limit_gets_413(server, demo_root):
    paths = sorted((demo_root / "brick" / "test").rglob("*.png"))[:8]  # the queue holds 2, a batch 4
    assert len(paths) == 8
    files = [("files", (p.name, p.read_bytes(), "image/png")) for p in paths]
    out = requests.post(f"{server}/v1/predict/batch?model=brick", files=files, headers=KEY)
    assert out.status_code == 200 and [r["file"] for r in out.json()["results"]] == [p.name for p in paths]
    single = requests.post(f"{server}/v1/predict?model=brick", data=paths[7].read_bytes(), headers=KEY).json()
    assert out.json()["results"][7]["score"] == pytest.approx(single["score"], rel=1e-6)
    over = requests.post(f"{server}/v1/predict/batch?model=brick", files=files + files[:1], headers=KEY)
    assert over.status_code == 413 and over.json() == {
        "error": "more than 8 images in one batch (the limit of --max-batch-images)"}


def test_media_types_are_case_blind(server, demo_root):
    from urllib3 import encode_multipart_formdata

    good = next((demo_root / "brick" / "test" / "good").glob("*.png")).read_bytes()
    body, content_type = encode_multipart_formdata({"file": ("x.png", good, "image/png")})
    for route in ("/v1/predict", "/v1/predict/batch"):
        response = requests.post(f"{server}{route}?model=brick", data=body,
                                 headers={**KEY, "Content-Type": content_type.replace("multipart/form-data",
                                                                                      "Multipart/Form-Data")})
        assert response.status_code == 200, (route, response.text)


def test_a_content_type_that_only_begins_as_multipart_is_named(server, demo_root):
    """Starlette found no part in `multipart/form-data,boundary=x`: the 400 said the body was cut short."""
    from urllib3 import encode_multipart_formdata

    good = next((demo_root / "brick" / "test" / "good").glob("*.png")).read_bytes()
    body, content_type = encode_multipart_formdata({"file": ("x.png", good, "image/png")})
    for route in ("/v1/predict", "/v1/predict/batch"):
        response = requests.post(f"{server}{route}?model=brick", data=body,
                                 headers={**KEY, "Content-Type": content_type.replace("; ", ",")})
        assert response.status_code == 400 and "is not multipart/form-data" in response.json()["error"], route


def test_a_query_parameter_given_twice_is_refused(server, demo_root):
    """`?model=nope&model=brick` was scored by brick, the last one, without a word."""
    good = next((demo_root / "brick" / "test" / "good").glob("*.png")).read_bytes()
    for query in ("model=nope&model=brick", "model=brick&heatmap=1&heatmap=0"):
        response = requests.post(f"{server}/v1/predict?{query}", data=good, headers=KEY)
        assert response.status_code == 400 and "given 2 times; give it once" in response.json()["error"], query


def test_a_file_sent_as_a_text_field_is_told_how_to_send_it(server):
    """`curl -F "file=<image.png"` sends the field as text: the message said to use the field it had used."""
    response = requests.post(f"{server}/v1/predict?model=brick", files={"file": (None, "text")}, headers=KEY)
    assert response.status_code == 400 and "'file' as a file: curl -F file=@image.png" in response.json()["error"]


def test_a_client_that_hangs_up_mid_upload_is_no_server_error(server, ray_cluster):
    host, port = server.removeprefix("http://").split(":")
    logs = Path(ray_cluster.head_node.get_logs_dir_path())

    def log_text() -> str:
        return "".join(p.read_text(errors="replace") for p in logs.rglob("*") if p.is_file() and p.suffix in
                       (".log", ".err", ".out"))

    def dropped() -> int:
        """Requests the ingress replica saw dropped: by rayad's handler (499) or by Serve's cancel (CANCELLED)."""
        text = log_text()
        return text.count("/v1/predict 499") + text.count("/v1/predict CANCELLED")

    def hang_up() -> bool:
        """Whether the hang-up reached the ingress replica (the proxy may drop it before it gets there)."""
        before = dropped()
        with socket.create_connection((host, int(port))) as client:
            client.sendall(b"POST /v1/predict?model=brick HTTP/1.1\r\nHost: x\r\nX-API-Key: secret\r\n"
                           b"Content-Length: 100000\r\n\r\n" + b"\0" * 1000)
            time.sleep(2)
        deadline = time.time() + 10
        while dropped() == before and time.time() < deadline:
            time.sleep(0.5)
        return dropped() > before

    def errors() -> list[str]:
        return [line for line in log_text().splitlines() if "unexpected error" in line or "TaskCancelledError" in line]

    earlier = len(errors())  # the logs are the whole session's
    tries = next((n for n in range(1, 6) if hang_up()), None)
    assert tries, "none of 5 hang-ups reached the ingress replica"
    print(f"\nthe ingress replica saw the hang-up after {tries} tries")
    time.sleep(1)
    assert errors()[earlier:] == []
    assert requests.get(f"{server}/healthz").status_code == 200
    assert requests.head(f"{server}/healthz").status_code == 200  # monitors that send HEAD


def test_bad_input_never_gives_500(server, demo_root):
    good = next((demo_root / "brick" / "test" / "good").glob("*.png")).read_bytes()
    gray = _png(np.random.default_rng(0).integers(0, 256, (40, 50), dtype=np.uint8))
    bomb = _png(np.zeros((1500, 1500), np.uint8))  # 2.25 M pixels in a few KB
    cases = [
        ("non-image bytes", b"hello, world", 400, "not a readable image"),
        ("truncated PNG", good[: len(good) // 2], 400, "not a readable image"),
        ("empty body", b"", 400, "empty body"),
        ("oversize upload", b"\0" * 300_000, 413, "over the limit"),
        ("decompression bomb", bomb, 413, "pixels is over the limit"),
        ("bomb over Pillow's own limit", _png_header(20_000, 20_000), 413, "over the pixel limit"),
    ]
    for what, body, status, message in cases:
        response = requests.post(f"{server}/v1/predict?model=brick", data=body, headers=KEY)
        assert response.status_code == status, what
        assert message in response.json()["error"], what
        assert "<_io." not in response.json()["error"] and "object at 0x" not in response.json()["error"], what
    upload = requests.post(f"{server}/v1/predict?model=brick", headers=KEY,
                           files={"file": ("x.png", b"hello, world", "image/png")}).json()["error"]
    assert upload == "image: not a readable image (rayad reads PNG, JPEG, BMP, TIFF and WebP)"
    unknown = requests.post(f"{server}/v1/predict?model=nope", data=good, headers=KEY)
    assert unknown.status_code == 404 and "unknown model 'nope'" in unknown.json()["error"]
    long_name = requests.post(f"{server}/v1/predict?model={'x' * 5000}", data=good, headers=KEY)
    assert long_name.status_code == 404 and f"{'x' * 80}… (5,000 characters)'" in long_name.json()["error"]
    assert len(long_name.json()["error"]) < 200
    ambiguous = requests.post(f"{server}/v1/predict", data=good, headers=KEY)
    assert ambiguous.status_code == 400 and "pick one with ?model=" in ambiguous.json()["error"]
    bad_param = requests.post(f"{server}/v1/predict?model=brick&heatmap=maybe", data=good, headers=KEY)
    assert bad_param.status_code == 422 and "heatmap" in bad_param.json()["error"]
    assert requests.post(f"{server}/v1/predict?model=brick", data=gray, headers=KEY).status_code == 200
    assert requests.post(f"{server}/v1/predict?model=brick", data=good, headers=KEY).json()["score"] > 0


def test_a_multipart_body_cut_short_is_refused_not_answered_without_its_last_files(server, demo_root):
    """Starlette's parser drops a part that was cut short: a batch answered 200 with fewer results than files."""
    from urllib3 import encode_multipart_formdata

    good = next((demo_root / "brick" / "test" / "good").glob("*.png")).read_bytes()
    for path, files in [("/v1/predict/batch", 3), ("/v1/predict", 1)]:
        body, content_type = encode_multipart_formdata([("file", (f"{i}.png", good)) for i in range(files)])
        boundary = b"--" + content_type.split("boundary=")[1].encode()
        closing, last_part = body.rindex(boundary), body.rindex(boundary, 0, body.rindex(boundary))
        for cut in (closing, last_part + 300, last_part + 10):  # before its closing boundary, in a file, a header
            response = requests.post(f"{server}{path}?model=brick", data=body[:cut], headers={
                **KEY, "Content-Type": content_type})
            assert response.status_code == 400, (path, cut, response.text)
            assert response.json()["error"] == ("malformed multipart body (cut short: its closing boundary never "
                                                "came)")
        whole = requests.post(f"{server}{path}?model=brick", data=body, headers={**KEY, "Content-Type": content_type})
        assert whole.status_code == 200 and len(whole.json().get("results", [None])) == files


def test_a_text_field_beside_the_files_is_refused_not_dropped(server, demo_root):
    """README: the one file of the form and no other field. A field beside the file was dropped without a word."""
    good = next((demo_root / "brick" / "test" / "good").glob("*.png")).read_bytes()
    for path in ("/v1/predict", "/v1/predict/batch"):
        with_text = requests.post(f"{server}{path}?model=brick", headers=KEY, files=[("file", ("0.png", good))],
                                  data={"threshold": "0.9"})
        assert with_text.status_code == 400 and with_text.json()["error"] == (
            "the form's field 'threshold' is no file; send only images"), with_text.text


def test_api_key(server, demo_root):
    good = next((demo_root / "brick" / "test" / "good").glob("*.png")).read_bytes()
    assert requests.post(f"{server}/v1/predict?model=brick", data=good).status_code == 401
    # the key is checked before the parameters: a client without it learns nothing about them
    assert requests.post(f"{server}/v1/predict?model=brick&heatmap=maybe", data=good).status_code == 401
    assert requests.post(f"{server}/v1/predict/batch?heatmap=maybe").status_code == 401
    wrong = requests.post(f"{server}/v1/predict?model=brick", data=good, headers={"X-API-Key": "guess"})
    assert wrong.status_code == 401 and "API key" in wrong.json()["error"]
    bearer = requests.post(f"{server}/v1/predict?model=brick", data=good, headers={"Authorization": "Bearer secret"})
    assert bearer.status_code == 200
    for auth in ("secret", "Basic secret", "Bearer guess", "Bearer"):  # a bare key is not a Bearer token
        refused = requests.post(f"{server}/v1/predict?model=brick", data=good, headers={"Authorization": auth})
        assert refused.status_code == 401 and "API key" in refused.json()["error"], auth
        assert refused.headers["WWW-Authenticate"] == "Bearer"
    assert requests.get(f"{server}/healthz").status_code == 200  # probes need no key


def test_a_bearer_token_keeps_the_bytes_of_its_key():
    """str.strip() took 0xa0 off 'keyà' (C3 A0 in UTF-8), as Starlette decodes headers as Latin-1: only the
    X-API-Key header worked."""
    from fastapi import HTTPException
    from starlette.requests import Request

    from rayad.serve.app import authorize

    def request(value: str) -> Request:
        return Request({"type": "http", "headers": [(b"authorization", value.encode())]})

    authorize(request("Bearer keyà  "), "keyà")
    with pytest.raises(HTTPException):
        authorize(request("Bearer key"), "keyà")


@pytest.mark.parametrize("key", ["s3cr3t\n", " s3cr3t", "s3\x00cr3t"])
def test_a_key_no_header_can_carry_is_refused_before_serve_starts(key):
    """A key file's final newline: the server started, and no request could ever authenticate."""
    from rayad.errors import ConfigError

    with pytest.raises(ConfigError, match="api_key .* no HTTP header can carry") as refused:
        ServeSettings(models={"m": "/nowhere"}, api_key=key)
    assert "s3" not in str(refused.value)  # the key itself is not shown


def test_docs_and_schema_need_the_key(server):
    for path in ("/docs", "/redoc", "/openapi.json"):
        refused = requests.get(f"{server}{path}")
        assert refused.status_code == 401 and "API key" in refused.json()["error"], path
        wrong = requests.get(f"{server}{path}", headers={"X-API-Key": "guess"})
        assert wrong.status_code == 401, path
        assert requests.get(f"{server}{path}", headers=KEY).status_code == 200, path
    schema = requests.get(f"{server}/openapi.json", headers={"Authorization": "Bearer secret"}).json()
    assert {"/v1/predict", "/v1/predict/batch", "/v1/models"} <= set(schema["paths"])
    assert not {"/docs", "/redoc", "/openapi.json"} & set(schema["paths"])
    bodies = {path: schema["paths"][path]["post"]["requestBody"]["content"] for path in ("/v1/predict",
                                                                                          "/v1/predict/batch")}
    assert set(bodies["/v1/predict"]) == {"application/octet-stream", "multipart/form-data"}  # /docs can upload
    assert bodies["/v1/predict/batch"]["multipart/form-data"]["schema"]["properties"]["files"]["type"] == "array"
    assert "/openapi.json" in requests.get(f"{server}/docs", headers=KEY).text


def test_unknown_routes_and_wrong_methods_are_json_errors(server):
    unknown = requests.get(f"{server}/v2/predict", headers=KEY)
    assert unknown.status_code == 404 and unknown.json() == {
        "error": "no such route: /v2/predict (the API is listed at /docs)"}
    wrong = requests.get(f"{server}/v1/predict?model=brick", headers=KEY)
    assert wrong.status_code == 405 and wrong.json() == {"error": "method GET is not allowed on /v1/predict"}
    assert wrong.headers["Allow"] == "POST"
    assert requests.delete(f"{server}/v1/models", headers=KEY).json() == {
        "error": "method DELETE is not allowed on /v1/models"}
    slash = requests.post(f"{server}/v1/predict/", data=b"x", allow_redirects=False)  # redirected, before the key
    assert slash.status_code == 404 and slash.json() == {"error": "no such route: /v1/predict/ (the API is listed at "
                                                                  "/docs)"}


def test_overload_answers_503_quickly_and_the_server_stays_ready(server, demo_root):
    good = next((demo_root / "brick" / "test" / "good").glob("*.png")).read_bytes()
    statuses: list[int] = []
    refusals: list[tuple[float, str | None]] = []  # each 503: seconds to answer, Retry-After
    probes: list[int] = []  # /readyz under load: busy, not unready (it answered 503 when the queue was full)
    assert requests.get(f"{server}/readyz", timeout=60).status_code == 200  # every model scored once (alone too)

    def send():
        start = time.perf_counter()
        response = requests.post(f"{server}/v1/predict?model=brick", data=good, headers=KEY, timeout=60)
        statuses.append(response.status_code)
        if response.status_code == 503:
            refusals.append((time.perf_counter() - start, response.headers.get("Retry-After")))

    def probe():
        probes.append(requests.get(f"{server}/readyz", timeout=60).status_code)

    threads = [threading.Thread(target=probe if i % 8 == 7 else send) for i in range(48)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert set(statuses) <= {200, 503} and statuses.count(503) > 0 and statuses.count(200) > 0
    assert all(seconds < 5 and retry == "1" for seconds, retry in refusals), refusals
    assert probes == [200] * 6
    assert requests.post(f"{server}/v1/predict?model=brick", data=good, headers=KEY).status_code == 200


def test_killed_replica_recovers_without_restart(server, demo_root):
    from ray.util.state import list_actors

    good = next((demo_root / "brick" / "test" / "good").glob("*.png")).read_bytes()
    replicas = list_actors(filters=[("class_name", "=", "ServeReplica:rayad:Scorer"), ("state", "=", "ALIVE")])
    assert len(replicas) == 1
    outcomes: list[tuple[float, int]] = []
    stop = threading.Event()

    def traffic():
        while not stop.is_set():
            try:
                code = requests.post(f"{server}/v1/predict?model=brick", data=good, headers=KEY,
                                     timeout=120).status_code  # waits for the new replica on a loaded machine
            except requests.RequestException:
                code = -1
            outcomes.append((time.time(), code))

    thread = threading.Thread(target=traffic)
    thread.start()
    time.sleep(2)
    killed_at = time.time()
    os.kill(replicas[0]["pid"], signal.SIGKILL)
    deadline = killed_at + 90
    while not any(t > killed_at + 1 and code == 200 for t, code in outcomes[-5:]) and time.time() < deadline:
        time.sleep(0.5)
    time.sleep(2)
    stop.set()
    thread.join()
    after = [(t, c) for t, c in outcomes if t > killed_at]
    failed = sum(c != 200 for _, c in after)
    recovered = next(t for t, c in after if c == 200 and t > killed_at + 1) - killed_at
    print(f"\nreplica killed: {failed} of {len(after)} requests failed; recovered after {recovered:.1f}s")
    assert {c for _, c in after} <= {200, 503}  # failures are clean 503s, never 500 or a dropped connection
    assert after[-1][1] == 200 and recovered < 90


def test_dashboard_try_it_page_scores_through_serve(server, tiny_experiment, trained_run, demo_root, tmp_path,
                                                    monkeypatch):
    from streamlit.testing.v1 import AppTest

    exp, _ = tiny_experiment
    shutil.copytree(exp, tmp_path / exp.name)  # category brick; its best model is not the one served
    for name, value in {"RAYAD_RUNS": str(tmp_path), "RAYAD_SERVE_URL": server, "RAYAD_API_KEY": "secret"}.items():
        monkeypatch.setenv(name, value)
    image = demo_root / "brick" / "test" / "hole" / "001.png"

    def upload():
        at = AppTest.from_file(str(Path(__file__).resolve().parents[2] / "dashboard" / "app.py"),
                               default_timeout=120)
        at.run()
        at.switch_page("app_pages/try_it.py").run()
        return at.file_uploader[0].set_value(("hole.png", image.read_bytes(), "image/png")).run()

    at = upload()  # the served "brick" used to score it: another model's number, shown as this experiment's
    assert not at.exception and not at.metric
    assert "does not serve this experiment's best model" in at.error[0].value
    shutil.rmtree(tmp_path / exp.name / "best")
    shutil.copytree(trained_run, tmp_path / exp.name / "best")  # now the served brick (and grass) model
    at = upload()
    assert not at.exception and server in at.caption[0].value
    expected = Predictor.load(trained_run).predict_files([image])[0]
    assert {m.label: m.value for m in at.metric}["Score"] == f"{expected.scores[0]:.6f}"
    assert len(at.image) == 3

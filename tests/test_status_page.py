"""The status page's server, spoken to over HTTP on 127.0.0.1: the page, its JSON, its files, its buttons, its token."""

from __future__ import annotations

import http.client
import json
import os
import socket
from urllib.parse import quote

import pytest

from ArgsList import ArgStore
from frontend.app import run_main
from frontend.queue_control import read_control
from frontend.status_page import StatusPage, start_status_page
from frontend.status_page.server import check_status_settings
from sd_scripts.core.errors import ConfigError

PNG = bytes.fromhex("89504e470d0a1a0a0000000d4948445200000001000000010806000000"
                    "1f15c4890000000d4944415478da63f8cfc0f01f0005000201e2215bc20000000049454e44ae426082")


@pytest.fixture
def queue(tmp_path):
    """A queue folder with a status file as the queue writes it, a job's output folder, and a folder outside both."""
    folder, out, outside = tmp_path / "queue", tmp_path / "out", tmp_path / "outside"
    for path in (folder, out / "sample", outside):
        path.mkdir(parents=True)
    (out / "sample" / "tiny_000004_00.png").write_bytes(PNG)
    (folder / "job1.log").write_text("step 1\nstep 2\n", encoding="utf-8")
    (folder / "job1.json").write_text('{"huggingface_token": "hf_secret"}', encoding="utf-8")
    (outside / "secret.png").write_bytes(PNG + b"secret")
    (outside / "secret.log").write_text("secret", encoding="utf-8")
    os.symlink(outside / "secret.png", out / "sample" / "link.png")
    os.symlink(outside, out / "linked_folder")
    job = {"name": "job1.json", "state": "running", "step": 3, "total_steps": 8, "epoch": 1, "loss": 0.12,
           "lr": 1e-4, "it_per_s": 2.5, "eta_seconds": 2.0, "output_dir": str(out), "output_name": "tiny",
           "last_saved": None, "samples": [str(out / "sample" / "tiny_000004_00.png"), str(outside / "secret.png")],
           "log": str(folder / "job1.log"), "seconds": None, "retried": None, "reason": None}
    waiting = [dict(job, name=name, state="waiting", step=None, samples=[], log=None) for name in ("job2.json", "job3.json")]
    status = {"version": 1, "folder": str(folder), "pid": os.getpid(), "state": "running", "started": 1.0,
              "updated": 2.0, "eta_seconds": 30.0, "jobs": [job, *waiting],
              "curve": {"job": "job1.json", "step": [1, 2, 3], "loss": [0.2, float("nan"), 0.12], "lr": [1e-4] * 3},
              "log_tail": ["step 1", "step 2"]}
    (folder / "queue_status.json").write_text(json.dumps(status), encoding="utf-8")
    return {"folder": folder, "out": out, "outside": outside, "status": status}


@pytest.fixture
def page(queue):
    with StatusPage(str(queue["folder"] / "queue_status.json"), str(queue["folder"]), queue=True) as served:
        yield served


def request(page, method, path, body=None, headers=None):
    connection = http.client.HTTPConnection("127.0.0.1", page.port, timeout=10)
    send = {"Content-Type": "application/json"} if body is not None else {}
    send.update(headers or {})
    connection.request(method, path, body=None if body is None else json.dumps(body), headers=send)
    answer = connection.getresponse()
    data = answer.read()
    connection.close()
    return answer.status, answer.getheader("Content-Type"), data


def get_file(page, path, token=""):
    return request(page, "GET", "/file?path=" + quote(path, safe="") + token)


def test_page_and_its_json(page, queue):
    status, kind, html = request(page, "GET", "/")
    assert status == 200 and kind.startswith("text/html")
    assert b'id="stop-button"' in html and b'src="app.js"' in html
    for asset in ("/app.js", "/style.css"):
        assert request(page, "GET", asset)[0] == 200
    status, kind, data = request(page, "GET", "/api/status")
    view = json.loads(data, parse_constant=lambda name: pytest.fail(f"{name} in the JSON"))
    assert status == 200 and kind == "application/json"
    assert view["mode"] == "queue" and view["found"] and view["control"]["stop_after_current"] is False
    jobs = view["status"]["jobs"]
    assert [job["name"] for job in jobs] == ["job1.json", "job2.json", "job3.json"]
    # the sample inside the output folder gets a link, the one outside does not
    assert jobs[0]["sample_urls"] == ["/file?path=" + quote(queue["status"]["jobs"][0]["samples"][0], safe="")]
    assert jobs[0]["log_url"] is not None
    assert view["status"]["curve"]["loss"] == [0.2, None, 0.12]  # NaN is not JSON a browser reads


def test_page_waits_for_a_status_file(tmp_path):
    with StatusPage(str(tmp_path / "queue_status.json"), str(tmp_path), queue=True) as page:
        view = json.loads(request(page, "GET", "/api/status")[2])
    assert view["found"] is False and view["status"]["jobs"] == []


def test_sends_samples_and_logs_inside_the_allowed_folders(page, queue):
    status, kind, data = get_file(page, queue["status"]["jobs"][0]["samples"][0])
    assert (status, kind, data) == (200, "image/png", PNG)
    status, kind, data = get_file(page, str(queue["folder"] / "job1.log"))
    assert status == 200 and kind.startswith("text/plain") and data == b"step 1\nstep 2\n"


def test_refuses_every_path_outside(page, queue):
    out, outside, folder = str(queue["out"]), str(queue["outside"]), str(queue["folder"])
    refused = [
        os.path.join(outside, "secret.png"),                          # outside, plainly
        os.path.join(out, "..", "outside", "secret.png"),             # .. traversal
        os.path.join(out, "sample", "..", "..", "outside", "secret.log"),
        os.path.join(out, "sample", "link.png"),                      # a link inside pointing outside
        os.path.join(out, "linked_folder", "secret.png"),             # a linked folder pointing outside
        os.path.join(folder, "job1.json"),                            # inside, but a settings file (tokens)
        os.path.join(folder, "queue_status.json"),
        "sample/tiny_000004_00.png",                                  # relative
        "/etc/passwd",
        "",
    ]
    for path in refused:
        status, _, data = get_file(page, path)
        assert status == 403 and b"secret" not in data, path
    # encoded by hand: %2e%2e for .., %2f for /, and double encoding
    for raw in (quote(out) + "%2f%2e%2e%2foutside%2fsecret.png",
                quote(out) + "/%2e%2e/outside/secret.log",
                quote(out) + "%252f..%252foutside%252fsecret.png"):
        status, _, data = request(page, "GET", "/file?path=" + raw)
        assert status == 403 and b"secret" not in data, raw
    # paths of the page itself never reach the file system
    for raw in ("/..%2f..%2f..%2fetc%2fpasswd", "/%2e%2e/%2e%2e/etc/passwd", "/app.js/../../server.py",
                "/static/..%2fserver.py", "/file/../../etc/passwd"):
        status, _, data = request(page, "GET", raw)
        assert status in (403, 404) and b"root:" not in data and b"import" not in data, raw


def test_buttons_write_the_queue_control_file(page, queue):
    folder = str(queue["folder"])
    status, _, data = request(page, "POST", "/api/stop", {"stop": True})
    assert status == 200 and json.loads(data)["stop_after_current"] is True
    assert read_control(folder).stop_after_current
    assert json.loads(request(page, "GET", "/api/status")[2])["control"]["stop_after_current"] is True
    request(page, "POST", "/api/stop", {"stop": False})
    assert not read_control(folder).stop_after_current

    status, _, data = request(page, "POST", "/api/move", {"name": "job3.json", "delta": -1})
    assert status == 200 and json.loads(data)["order"] == ["job3.json", "job2.json"]
    view = json.loads(request(page, "GET", "/api/status")[2])
    assert [job["name"] for job in view["status"]["jobs"]] == ["job1.json", "job3.json", "job2.json"]

    status, _, data = request(page, "POST", "/api/move", {"name": "job1.json", "delta": 1})
    assert status == 409 and "job1.json is not waiting" in json.loads(data)["error"]
    assert request(page, "POST", "/api/move", {"name": "job2.json", "delta": "up"})[0] == 409
    assert request(page, "POST", "/api/move", ["job2.json"])[0] == 400
    assert request(page, "POST", "/api/nothing", {})[0] == 404


def test_buttons_refuse_requests_another_site_could_send(page, queue):
    form = {"Content-Type": "application/x-www-form-urlencoded"}
    assert request(page, "POST", "/api/stop", {"stop": True}, form)[0] == 403
    assert request(page, "POST", "/api/stop", {"stop": True}, {"Origin": "http://evil.example"})[0] == 403
    assert request(page, "GET", "/api/status", headers={"Host": "evil.example:7861"})[0] == 403  # DNS rebinding
    assert not read_control(str(queue["folder"])).stop_after_current
    origin = f"http://127.0.0.1:{page.port}"
    assert request(page, "POST", "/api/stop", {"stop": True}, {"Origin": origin})[0] == 200


def test_with_a_token_every_request_without_it_is_refused(queue):
    folder = queue["folder"]
    with StatusPage(str(folder / "queue_status.json"), str(folder), queue=True, token="s3cret-token") as page:
        sample = queue["status"]["jobs"][0]["samples"][0]
        for method, path, body in [("GET", "/", None), ("GET", "/app.js", None), ("GET", "/api/status", None),
                                   ("GET", "/file?path=" + quote(sample, safe=""), None), ("GET", "/missing", None),
                                   ("POST", "/api/stop", {"stop": True}), ("HEAD", "/", None)]:
            for token in ("", "?token=wrong", "?token="):
                status, _, data = request(page, method, path + (("&" if "?" in path else "?") + token[1:]
                                                                 if token else ""), body)
                assert status == 403 and b"<html" not in data and PNG not in data, (method, path, token)
        assert not read_control(str(folder)).stop_after_current
        status, _, html = request(page, "GET", "/?token=s3cret-token", headers={"Host": "192.168.1.5:7861"})
        assert status == 200 and b'src="app.js?token=s3cret-token"' in html
        assert get_file(page, sample, "&token=s3cret-token")[0] == 200
        assert page.url.endswith(f":{page.port}/?token=s3cret-token")


def test_listening_beyond_this_computer_makes_and_prints_a_token(queue):
    lines: list[str] = []
    store = ArgStore(multi_run_folder=str(queue["folder"]), status_port=0, status_listen="0.0.0.0")
    page = start_status_page(store, say=lines.append)
    try:
        assert page.token and len(page.token) >= 20 and lines[0] == f"status page: {page.url}"
        assert f"?token={page.token}" in lines[0] and "shown only this once" in lines[1]
        assert request(page, "GET", "/api/status")[0] == 403
        assert request(page, "GET", f"/api/status?token={page.token}")[0] == 200
    finally:
        page.close()
    store = ArgStore(multi_run_folder=str(queue["folder"]), status_port=0)
    with start_status_page(store, say=lines.append) as page:
        assert page.token is None and page.url == f"http://127.0.0.1:{page.port}/"
    assert start_status_page(ArgStore(multi_run_folder=str(queue["folder"])), say=lines.append) is None


def test_single_training_page_reads_its_own_status_file(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    status = {"version": 1, "state": "running", "updated": 1.0, "jobs": [{"name": "my_lora", "state": "running",
                                                                        "step": 1, "total_steps": 4}]}
    (out / "my_lora_status.json").write_text(json.dumps(status), encoding="utf-8")
    store = ArgStore(output_folder=str(out), change_output_name="my_lora", status_port=0)
    with start_status_page(store, say=lambda text: None) as page:
        view = json.loads(request(page, "GET", "/api/status")[2])
        assert view["mode"] == "training" and view["control"] is None
        assert view["status"]["jobs"][0]["step"] == 1
        assert request(page, "POST", "/api/stop", {"stop": True})[0] == 409
    assert not (out / "queue_control.json").exists()


def busy_port():
    holder = socket.socket()
    holder.bind(("127.0.0.1", 0))
    holder.listen(1)
    return holder


def test_port_in_use_is_one_line_naming_it_and_how_to_choose_another(queue):
    holder = busy_port()
    port = holder.getsockname()[1]
    try:
        store = ArgStore(multi_run_folder=str(queue["folder"]), status_port=port)
        with pytest.raises(ConfigError, match=f"status_port: port {port} is already in use on 127.0.0.1") as err:
            start_status_page(store, say=lambda text: None)
        assert f"--status_port {port + 1}" in str(err.value) and "--status_port 0" in str(err.value)
    finally:
        holder.close()


def test_main_exits_2_on_a_port_in_use_before_the_queue_starts(queue, capsys):
    before = sorted(os.listdir(queue["folder"]))
    holder = busy_port()
    port = holder.getsockname()[1]
    try:
        code = run_main(["--multi_run_path", str(queue["folder"]), "--status_port", str(port)])
    finally:
        holder.close()
    captured = capsys.readouterr()
    assert code == 2
    assert captured.err.strip().splitlines() == [
        f"error: status_port: port {port} is already in use on 127.0.0.1 (another status page or program); "
        f"choose another with --status_port {port + 1}, or --status_port 0 for any free port"]
    assert sorted(os.listdir(queue["folder"])) == before


def test_bad_status_settings():
    with pytest.raises(ConfigError, match="status_port: 70000 is not a port number"):
        check_status_settings(ArgStore(status_port=70000))
    with pytest.raises(ConfigError, match="status_listen: 0.0.0.0 is set but the status page is off; add --status_port"):
        check_status_settings(ArgStore(status_listen="0.0.0.0"))
    with pytest.raises(ConfigError, match="status_listen: empty"):
        check_status_settings(ArgStore(status_port=7861, status_listen=" "))
    check_status_settings(ArgStore(status_port=0, status_listen="0.0.0.0"))

"""`medsam2 serve`: the console verb's checks, and the real process end to end."""

import httpx
import numpy as np
import pytest

import medsam2
from medsam2.remote.client import SessionReopened
from medsam2.remote.net import is_loopback
from remote_fixtures import TOKEN, ServeProcess, make_volume, same_frames


def test_serve_refuses_a_network_address_without_a_token(monkeypatch, capsys, tmp_path):
    from medsam2 import cli

    monkeypatch.delenv("MEDSAM2_TOKEN", raising=False)
    assert cli.main(["serve", "--host", "0.0.0.0", "--checkpoint", str(tmp_path / "none.pt")]) == 1
    assert "no such file" in capsys.readouterr().err  # arguments are checked before anything loads
    for host in ("0.0.0.0", "192.168.1.20", "gpu-box.local"):
        assert cli.main(["serve", "--host", host]) == 1
        err = capsys.readouterr().err
        assert f"refusing to listen on {host} without a token" in err and "--insecure" in err
    empty = tmp_path / "empty"
    empty.write_text("\n")
    assert cli.main(["serve", "--token-file", str(empty)]) == 1
    assert "first line is empty" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main(["serve", "--token", "a", "--token-file", str(empty)])


def test_serve_end_to_end(random_checkpoint, tmp_path):
    served = ServeProcess(random_checkpoint, tmp_path, args=["--max-sessions", "2", "--session-ttl", "60",
                                                             "--max-upload-mb", "4", "--max-uploads", "3"])
    try:
        with medsam2.connect(served.url, token=TOKEN) as remote:
            info = remote.refresh_info()
            assert (info["image_size"], info["sessions"]["max"], info["max_upload_mb"]) == (256, 2, 4)
            assert info["session_ttl"] == 60 and info["weights_are_random"]
            assert info["limits"]["max_uploads"] == 3 and info["limits"]["max_side"] == 4096
            session = remote.open(make_volume(slices=4))
            assert session.add_prompt(1, points=[[33, 30]], labels=[1]).shape == (64, 64)
            session.close()
        assert httpx.get(f"{served.url}/v1/info", timeout=5).status_code == 401
    finally:
        output = served.stop()
    assert "token required" in output and "RANDOM WEIGHTS" in output
    assert TOKEN not in output


@pytest.mark.parametrize("host, loopback", [
    ("localhost", True), ("LOCALHOST", True), ("LocalHost.", True), ("127.0.0.1", True), ("127.9.8.7", True),
    ("::1", True), ("[::1]", True), ("0.0.0.0", False), ("192.168.1.20", False), ("gpu-box.local", False),
    ("localhost.example.org", False), ("", False)])
def test_one_loopback_rule_for_the_server_and_the_client(host, loopback):
    """`medsam2 serve` needs no token there, and the client ignores proxy settings there."""
    assert is_loopback(host) is loopback


def history(correction):
    """A session's life: prompts on two objects, a propagation, a hand-edited correction on a
    propagated slice refined by a second propagation, a click and its clear, an object added and
    removed."""
    return [
        lambda s: s.add_prompt(2, obj_id=1, points=[[33, 30], [10, 10]], labels=[1, 0]),
        lambda s: s.add_prompt(4, obj_id=2, box=(24, 20, 44, 42)),
        lambda s: list(s.propagate()),
        lambda s: s.add_prompt(3, obj_id=1, mask=correction),
        lambda s: list(s.propagate(direction="forward", start=3)),
        lambda s: s.add_prompt(5, obj_id=1, points=[[31, 31]], labels=[1]),
        lambda s: s.clear_prompts(5, 1),
        lambda s: s.add_prompt(1, obj_id=3, points=[[30, 28]], labels=[1]),
        lambda s: s.remove_object(3),
    ]


def test_masks_after_a_sigkill_and_restart_equal_masks_without_one(model, random_checkpoint, tmp_path):
    vol = make_volume(slices=6, seed=31)
    correction = np.zeros((64, 64), bool)
    correction[24:36, 26:40] = True
    local = model.open(vol)
    for step in history(correction):
        step(local)
    served = ServeProcess(random_checkpoint, tmp_path, name="first")
    try:
        remote = medsam2.connect(served.url, token=TOKEN).open(vol)
        for step in history(correction):
            step(remote)
        assert np.array_equal(remote.masks(), local.masks())
        served.kill()  # SIGKILL: the server's memory is gone, sessions and volume with it
        served = ServeProcess(random_checkpoint, tmp_path, port=served.port, name="second")
        reopened = []
        remote.on_reopen = reopened.append
        with pytest.warns(SessionReopened) as warned:
            got = remote.add_prompt(5, obj_id=2, points=[[34, 32]], labels=[1])
        assert np.array_equal(got, local.add_prompt(5, obj_id=2, points=[[34, 32]], labels=[1]))
        same_frames(list(remote.propagate(direction="forward", start=5)),
                    list(local.propagate(direction="forward", start=5)))
        labels = remote.masks()
        assert np.array_equal(labels, local.masks())
        assert set(np.unique(labels)) == {0, 1, 2}, "both objects must have foreground for this to mean anything"
        assert "replayed 5 prompt(s) and 2 propagation(s)" in str(warned[0].message)
        assert reopened == [str(warned[0].message)]
    finally:
        served.stop()

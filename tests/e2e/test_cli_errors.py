"""Bad input to the CLI: one clear line on stderr and a non-zero exit."""
import struct

from conftest import model_path


def test_missing_model_file(run_tern, tmp_path):
    r = run_tern("run", "-m", str(tmp_path / "nope.gguf"), "-p", "hi")
    assert r.returncode != 0
    err = r.stderr.decode()
    assert "nope.gguf" in err and "not found" in err
    assert err.count("\n") == 1


def test_not_a_gguf(run_tern, tmp_path):
    p = tmp_path / "model.gguf"
    p.write_bytes(b"this is not a gguf file at all" * 10)
    r = run_tern("run", "-m", str(p), "-p", "hi")
    assert r.returncode != 0
    assert "magic" in r.stderr.decode()


def gguf_bytes(arch, tensor_type=0, kvs=()):
    """A minimal GGUF v3 file: an architecture key, u32 keys, one tensor."""
    def s(x):
        b = x.encode()
        return struct.pack("<Q", len(b)) + b
    kv = s("general.architecture") + struct.pack("<I", 8) + s(arch)
    for k, v in kvs:
        kv += s(k) + struct.pack("<II", 4, v)
    n0 = {0: 32, 23: 256}[tensor_type]
    ti = s("token_embd.weight") + struct.pack("<I", 2) + \
        struct.pack("<qq", n0, 4) + struct.pack("<I", tensor_type) + \
        struct.pack("<Q", 0)
    head = b"GGUF" + struct.pack("<IQQ", 3, 1, 1 + len(kvs)) + kv + ti
    head += b"\0" * (-len(head) % 32)
    size = {0: 32 * 4 * 4, 23: 4 * 136}[tensor_type]  # F32, IQ4_XS
    return head + b"\0" * size


def test_unsupported_architecture(run_tern, tmp_path):
    p = tmp_path / "mamba.gguf"
    p.write_bytes(gguf_bytes("mamba"))
    r = run_tern("run", "-m", str(p), "-p", "hi")
    assert r.returncode != 0
    assert "unsupported architecture 'mamba'" in r.stderr.decode()


def test_unsupported_tensor_type(run_tern, tmp_path):
    # A llama file whose embedding is IQ4_XS (a type tern cannot compute).
    p = tmp_path / "iq.gguf"
    kvs = [("llama.embedding_length", 256), ("llama.block_count", 1),
           ("llama.feed_forward_length", 256),
           ("llama.attention.head_count", 4)]
    p.write_bytes(gguf_bytes("llama", tensor_type=23, kvs=kvs))
    r = run_tern("run", "-m", str(p), "-p", "hi")
    assert r.returncode != 0
    err = r.stderr.decode()
    assert "token_embd.weight" in err and "IQ4_XS" in err, err


def test_bad_options(run_tern):
    m = model_path("smollm2-135m")
    for args, needle in [
        (["run", "-m", m, "-p", "x", "-n", "abc"], "-n"),
        (["run", "-m", m, "-p", "x", "--temp", "nan"], "--temp"),
        (["run", "-m", m], "a prompt is required"),
        (["bench", "-m", m, "-t", "0"], "-t"),
        (["frobnicate"], "unknown command"),
    ]:
        r = run_tern(*args)
        assert r.returncode != 0, args
        assert needle in r.stderr.decode(), (args, r.stderr)


# ---- `tern serve`: impossible configurations are refused at startup

import pytest  # noqa: E402


@pytest.mark.parametrize("args,fragment", [
    ([], "give a model"),
    (["-m", "MODEL", "--kv-mem", "1"], "fewer than 2 blocks"),
    (["-m", "MODEL", "--kv-mem", "lots"], "--kv-mem"),
    (["-m", "MODEL", "--port", "70000"], "--port"),
    (["-m", "MODEL", "--ctx", "1"], "--ctx"),
    (["-m", "MODEL", "--max-seqs", "0"], "--max-seqs"),
    (["-m", "MODEL", "--host", "not-an-address"], "--host"),
    (["--config", "/nonexistent/models.yaml"], "models.yaml"),
    (["-m", "MODEL", "--config", "models.yaml"], "not both"),
    (["-m", "/nonexistent/model.gguf"], "model.gguf"),
    (["-m", "MODEL", "stray"], "unexpected argument"),
])
def test_serve_refuses_bad_configuration(run_tern, args, fragment):
    args = [model_path("smollm2-135m") if a == "MODEL" else a for a in args]
    r = run_tern("serve", "--port", "0", *args, timeout=60)
    assert r.returncode != 0
    err = r.stderr.decode()
    assert "tern: error:" in err and fragment in err, err


def test_serve_bad_config_file_names_the_key(run_tern, tmp_path):
    cfg = tmp_path / "models.yaml"
    cfg.write_text("models:\n  - name: a\n    path: x.gguf\n    threads: lots\n")
    r = run_tern("serve", "--config", str(cfg), timeout=60)
    assert r.returncode != 0
    err = r.stderr.decode()
    assert "threads" in err and "models.yaml" in err, err

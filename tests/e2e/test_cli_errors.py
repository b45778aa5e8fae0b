"""Bad input to the CLI: one clear line on stderr and a non-zero exit."""
import struct

from conftest import model_path


def test_missing_model_file(run_tern, tmp_path):
    r = run_tern("run", "-m", str(tmp_path / "nope.gguf"), "-p", "hi")
    assert r.returncode != 0
    err = r.stderr.decode()
    assert "nope.gguf" in err and "No such file" in err
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
        (["run", "-m", m], "-p PROMPT"),
        (["bench", "-m", m, "-t", "0"], "-t"),
        (["frobnicate"], "unknown command"),
    ]:
        r = run_tern(*args)
        assert r.returncode != 0, args
        assert needle in r.stderr.decode(), (args, r.stderr)

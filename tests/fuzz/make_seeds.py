#!/usr/bin/env python3
"""Write the seed corpora of the fuzz targets into tests/fuzz/corpus.

Each seed is a small valid input, or one with a single known defect, so
that the fuzzer starts from the formats' real structure. The script uses
only the standard library and overwrites the seeds it writes, so its
output is the same on every run. Run it from the repository root:

    python3 tests/fuzz/make_seeds.py
"""
import glob
import json
import os
import shutil
import struct

CORPUS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "corpus")


def write(target, name, data):
    directory = os.path.join(CORPUS, target)
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, name), "wb") as f:
        f.write(data)


# ---- .npy ---------------------------------------------------------------

def npy(descr, shape, data, version=(1, 0), fortran=False):
    """Return a .npy file as np.save() lays it out."""
    shape_text = "(" + "".join("%d, " % d for d in shape)
    shape_text = shape_text[:-2] + ",)" if len(shape) == 1 else shape_text.rstrip(", ") + ")"
    header = "{'descr': '%s', 'fortran_order': %s, 'shape': %s, }" % (
        descr, "True" if fortran else "False", shape_text)
    length_bytes = 2 if version == (1, 0) else 4
    prefix = 6 + 2 + length_bytes
    total = prefix + len(header) + 1
    header += " " * ((64 - total % 64) % 64) + "\n"
    length = struct.pack("<H" if length_bytes == 2 else "<I", len(header))
    return b"\x93NUMPY" + bytes(version) + length + header.encode("latin-1") + data


def npy_seeds():
    f4 = struct.pack("<12f", *[i * 0.5 - 2 for i in range(12)])
    write("npy", "f4-3x4.npy", npy("<f4", (3, 4), f4))
    write("npy", "f2-2x3.npy", npy("<f2", (2, 3), struct.pack("<6e", 1, -2, 0.5, 0, 65504, -0.0)))
    write("npy", "f8-2x2.npy", npy("<f8", (2, 2), struct.pack("<4d", 1e300, -1e-300, 3.25, float("nan"))))
    write("npy", "i4-5.npy", npy("<i4", (5,), struct.pack("<5i", -1, 0, 1, 2**31 - 1, -2**31)))
    write("npy", "i8-scalar.npy", npy("<i8", (), struct.pack("<q", 42)))
    write("npy", "bool-4.npy", npy("|b1", (4,), bytes([0, 1, 1, 0])))
    write("npy", "u1-cnpy-order.npy", npy("<u1", (2, 2), bytes([0, 7, 255, 3])))
    write("npy", "v2-f4-2x2.npy", npy("<f4", (2, 2), f4[:16], version=(2, 0)))
    write("npy", "v3-f4-1.npy", npy("<f4", (1,), f4[:4], version=(3, 0)))
    write("npy", "fortran-1d.npy", npy("<f4", (3,), f4[:12], fortran=True))
    write("npy", "empty-0x5.npy", npy("<f4", (0, 5), b""))
    write("npy", "big-endian.npy", npy(">f4", (2,), f4[:8]))
    write("npy", "truncated.npy", npy("<f4", (3, 4), f4[:40]))
    write("npy", "trailing.npy", npy("<f4", (2,), f4[:12]))
    write("npy", "eight-dims.npy", npy("<f4", (1, 1, 1, 1, 1, 1, 1, 2), f4[:8]))


# ---- safetensors --------------------------------------------------------

def safetensors(tensors, metadata=None, pad_to=8):
    """Return a safetensors file; tensors maps name -> (dtype, shape, bytes)."""
    header = {}
    if metadata is not None:
        header["__metadata__"] = metadata
    data = b""
    for name, (dtype, shape, raw) in tensors.items():
        header[name] = {"dtype": dtype, "shape": list(shape),
                        "data_offsets": [len(data), len(data) + len(raw)]}
        data += raw
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * ((pad_to - (8 + len(text)) % pad_to) % pad_to)
    return struct.pack("<Q", len(text)) + text + data


def safetensors_seeds():
    a = ("F32", (2, 3), struct.pack("<6f", 1, 2, 3, -4, 0.5, 1e-3))
    b = ("BF16", (4,), bytes([0x80, 0x3f, 0x00, 0xc0, 0x49, 0x40, 0x00, 0x00]))
    xy = ("F16", (2, 2), struct.pack("<4e", 1, -1, 0.25, 2))
    w = ("F8_E4M3", (4, 4), bytes(range(0x30, 0x40)))
    w_scale = ("F32", (1, 1), struct.pack("<f", 0.125))
    write("safetensors", "f32-bf16.safetensors", safetensors({"a": a, "b": b}, {"format": "pt"}))
    write("safetensors", "f16.safetensors", safetensors({"x.y": xy}))
    write("safetensors", "fp8-scaled.safetensors", safetensors({"w": w, "w_scale_inv": w_scale}))
    write("safetensors", "fp8-no-scale.safetensors", safetensors({"w": w}))
    write("safetensors", "empty-header.safetensors", safetensors({}))
    write("safetensors", "scalar.safetensors", safetensors({"a": ("F32", (), struct.pack("<f", 7))}))
    write("safetensors", "zero-size.safetensors", safetensors({"b": ("BF16", (0, 3), b"")}))
    good = safetensors({"a": a, "b": b})
    write("safetensors", "truncated.safetensors", good[:-3])
    overlap = bytearray(safetensors({"a": a, "b": ("F32", (1,), b"\0\0\0\0")}))
    text = overlap[8:8 + struct.unpack("<Q", overlap[:8])[0]].decode()
    text = text.replace('"data_offsets":[24,28]', '"data_offsets":[20,24]')
    write("safetensors", "overlap.safetensors", overlap[:8] + text.encode() + overlap[8 + len(text):])

    # Shard indexes, for the fixed shards a.safetensors and b.safetensors
    # that fuzz_safetensors writes next to them.
    def index(weight_map, metadata=None):
        body = {"weight_map": weight_map}
        if metadata is not None:
            body["metadata"] = metadata
        return json.dumps(body, indent=2).encode()
    write("safetensors", "index-two-shards.json",
          index({"a": "a.safetensors", "b": "b.safetensors"}, {"total_size": 32}))
    write("safetensors", "index-wrong-shard.json", index({"a": "b.safetensors"}))
    write("safetensors", "index-missing-shard.json", index({"a": "c.safetensors"}))
    write("safetensors", "index-empty-map.json", index({}))
    write("safetensors", "index-path-in-name.json", index({"a": "../a.safetensors"}))


# ---- config.json --------------------------------------------------------

def config_seeds(root):
    for path in sorted(glob.glob(os.path.join(root, "data", "layers", "*", "config.json"))):
        family = os.path.basename(os.path.dirname(path))
        shutil.copyfile(path, os.path.join(CORPUS, "config", family + ".json"))
    write("config", "not-an-object.json", b"[1, 2]")
    write("config", "unknown-type.json", b'{"model_type": "llama", "hidden_size": 64}')
    write("config", "mixtral-minimal.json", json.dumps({
        "model_type": "mixtral", "num_hidden_layers": 2, "hidden_size": 64,
        "intermediate_size": 128, "num_local_experts": 4,
        "num_experts_per_tok": 2}).encode())


# ---- ring ---------------------------------------------------------------

def ring_case(capacity_shift, tail, records, expected, send=0,
              peer_tail_behind=0, flags=0, head_extra=0):
    """Return a fuzz_ring input whose incoming ring contains `records`, a list
    of (tag, payload) written from index `tail`, as fuzz_ring.c parses it."""
    capacity = 64 << capacity_shift
    area = bytearray(capacity)
    at = tail
    for tag, payload in records:
        record = struct.pack("<II", len(payload), tag) + payload
        record += b"\0" * ((8 - len(record) % 8) % 8)
        for byte in record:
            area[at % capacity] = byte
            at += 1
    head_ahead = (at - tail + head_extra) % 2**64
    return (bytes([capacity_shift]) + struct.pack("<QQIIQ", tail % 2**64, head_ahead,
                                                  expected, send, peer_tail_behind)
            + bytes([flags]) + bytes(area))


def ring_seeds():
    hello = bytes(range(40))
    write("ring", "empty.bin", ring_case(2, 0, [], 0))
    write("ring", "one-record.bin", ring_case(2, 0, [(1, hello)], len(hello)))
    write("ring", "three-records.bin", ring_case(
        2, 64, [(1, hello), (1, b"x" * 100), (1, b"")], len(hello) + 100))
    write("ring", "straddles-end.bin", ring_case(2, 256 - 16, [(1, hello * 3)], 120))
    write("ring", "near-2-to-64.bin", ring_case(
        3, 2**64 - 24, [(1, hello), (1, hello)], 80, send=500))
    write("ring", "fills-ring.bin", ring_case(0, 0, [(1, b"f" * 56)], 56, send=5000))
    write("ring", "wrong-tag.bin", ring_case(2, 0, [(7, hello)], len(hello)))
    write("ring", "more-than-announced.bin", ring_case(2, 0, [(1, hello)], 10))
    write("ring", "head-too-far.bin", ring_case(2, 0, [(1, hello)], 40, head_extra=4096))
    write("ring", "tail-ahead.bin", ring_case(2, 0, [], 0, send=100,
                                              peer_tail_behind=2**64 - 8))
    write("ring", "misaligned-tail.bin", ring_case(2, 3, [(1, hello)], 40, flags=1))
    write("ring", "large-send.bin", ring_case(6, 0, [(1, b"z" * 1000)], 1000, send=65536))


def main():
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    npy_seeds()
    safetensors_seeds()
    os.makedirs(os.path.join(CORPUS, "config"), exist_ok=True)
    config_seeds(root)
    ring_seeds()


if __name__ == "__main__":
    main()

#!/usr/bin/env python3
"""Compute float64 golden vectors for one MoE layer of a Hugging Face checkpoint.

Usage:
    /usr/bin/python3 tools/torch_reference.py [--layer L] [--min-gap G] LAYER_DIR...

Each LAYER_DIR contains config.json, the weights as model.safetensors (or as
shards listed by model.safetensors.index.json) and tokens.npy, a (T, H)
float32 array of layer inputs. For each directory this script writes

    expected_output.npy       (T, H) '<f8', the layer output
    expected_topk_ids.npy     (T, K) '<i4', the selected experts of each
                              token, in order of decreasing selection score
    expected_aux_losses.json  the router's load-balancing loss and z-loss,
                              and both times the config's coefficients
    expected_kept.npy         (T, K) '|b1', false for an assignment that the
                              expert capacity dropped; written only for a
                              family with a capacity (switch_transformers)

and prints the smallest gap, over all tokens, between the K-th and the
(K+1)-th selection score. A gap below --min-gap (default 1e-4) means that
fp32 rounding in the code under test could pick a different expert than
this float64 reference, so the layer is not a fair test. The script then
writes nothing for that directory and exits with status 1.

The math is written from the published definition of each model family (see
docs/FAMILIES.md), independently of moe-ep's C code, and runs in float64
with torch. Ties in every selection go to the lower index: the lower expert
index in the top-k, and the lower group index in DeepSeek-V3's group
selection.

Exit status: 0 when every layer was written, 1 when some layer was too close
to a tie, 2 on invalid usage or input, 3 when an output file could not be
written. The worst status over all directories wins. Each error message names
the file, the tensor or field, the value and the reason.

This script must run under Debian's /usr/bin/python3, which has python3-torch
and python3-numpy. It reads safetensors files with its own parser.
"""

import argparse
import dataclasses
import json
import math
import os
import re
import struct
import sys
import tempfile

import numpy as np
import torch

DEFAULT_MIN_GAP = 1e-4

# DeepSeek-V3 stores one float32 dequantization factor per 128 x 128 block of
# each FP8 weight (README_WEIGHTS.md of deepseek-ai/DeepSeek-V3). Blocks at
# the right and bottom edges may be smaller.
FP8_BLOCK = 128

# The safetensors format caps the JSON header at 100 MB.
MAX_HEADER_BYTES = 100_000_000

ITEM_SIZES = {"F32": 4, "BF16": 2, "F16": 2, "F8_E4M3": 1}

FAMILIES = ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v3", "switch_transformers")

# The dense_act_fn values of Switch Transformers, by their transformers
# ACT2FN names, as float64 functions: "gelu" is the exact erf form and
# "gelu_new" the tanh approximation.
DENSE_ACTIVATIONS = {
    "relu": lambda v: torch.clamp(v, min=0.0),
    "gelu": lambda v: 0.5 * v * (1.0 + torch.erf(v / math.sqrt(2.0))),
    "gelu_new": lambda v: 0.5 * v * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (v + 0.044715 * v**3))),
    "silu": lambda v: v * torch.sigmoid(v),
}


class InputError(Exception):
    """An invalid input file, field or tensor, reported with exit status 2."""


# ---- JSON ------------------------------------------------------------------


def reject_duplicate_keys(pairs):
    result = {}
    for key, value in pairs:
        if key in result:
            raise ValueError(f"duplicate key {key!r}")
        result[key] = value
    return result


def load_json(path, text=None):
    """Parse a JSON file (or `text` read from it), rejecting duplicate keys."""
    try:
        if text is None:
            with open(path, "rb") as f:
                text = f.read().decode("utf-8")
        return json.loads(text, object_pairs_hook=reject_duplicate_keys)
    except FileNotFoundError:
        raise InputError(f"{path}: file not found") from None
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise InputError(f"{path}: invalid JSON: {e}") from None


# ---- safetensors -------------------------------------------------------------


@dataclasses.dataclass
class TensorEntry:
    path: str
    name: str
    dtype: str
    shape: tuple
    offset: int  # absolute byte offset of the data in the file
    nbytes: int


def parse_safetensors_header(path):
    """Return {name: TensorEntry} from the header of one safetensors file.

    The file starts with an 8-byte little-endian header length N, then N bytes
    of JSON, then the byte buffer that the data_offsets of each tensor index.
    """
    try:
        with open(path, "rb") as f:
            file_size = os.fstat(f.fileno()).st_size
            prefix = f.read(8)
            if len(prefix) != 8:
                raise InputError(f"{path}: file is {file_size} bytes, too short for the 8-byte header length")
            (header_len,) = struct.unpack("<Q", prefix)
            if header_len > MAX_HEADER_BYTES or 8 + header_len > file_size:
                raise InputError(f"{path}: header length {header_len} is invalid for a file of {file_size} bytes")
            header_bytes = f.read(header_len)
    except FileNotFoundError:
        raise InputError(f"{path}: file not found") from None
    except OSError as e:
        raise InputError(f"{path}: cannot read: {e.strerror}") from None

    try:
        header_text = header_bytes.decode("utf-8")
    except UnicodeDecodeError as e:
        raise InputError(f"{path}: header is not UTF-8: {e}") from None
    header = load_json(path, header_text)
    if not isinstance(header, dict):
        raise InputError(f"{path}: header is a JSON {type(header).__name__}, expected an object")

    buffer_start = 8 + header_len
    buffer_len = file_size - buffer_start
    entries = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        entries[name] = parse_tensor_info(path, name, info, buffer_start, buffer_len)
    return entries


def parse_tensor_info(path, name, info, buffer_start, buffer_len):
    where = f"{path}: tensor {name!r}"
    if not isinstance(info, dict):
        raise InputError(f"{where}: header entry is not a JSON object")
    dtype = info.get("dtype")
    shape = info.get("shape")
    offsets = info.get("data_offsets")
    if not isinstance(dtype, str):
        raise InputError(f"{where}: dtype {dtype!r} is missing or not a string")
    if not isinstance(shape, list) or not all(is_int(d) and d >= 0 for d in shape):
        raise InputError(f"{where}: shape {shape!r} is not a list of non-negative integers")
    if (
        not isinstance(offsets, list)
        or len(offsets) != 2
        or not all(is_int(o) for o in offsets)
        or not 0 <= offsets[0] <= offsets[1] <= buffer_len
    ):
        raise InputError(f"{where}: data_offsets {offsets!r} are invalid for a byte buffer of {buffer_len} bytes")
    nbytes = offsets[1] - offsets[0]
    if dtype in ITEM_SIZES:
        expected = math.prod(shape) * ITEM_SIZES[dtype]
        if nbytes != expected:
            raise InputError(f"{where}: data_offsets span {nbytes} bytes, but {dtype} {shape} needs {expected}")
    return TensorEntry(path, name, dtype, tuple(shape), buffer_start + offsets[0], nbytes)


def is_int(value):
    return isinstance(value, int) and not isinstance(value, bool)


def build_fp8_e4m3_table():
    """Decode all 256 FP8 E4M3 (the "fn" variant) codes from their bit fields.

    Layout: 1 sign bit, 4 exponent bits with bias 7, 3 mantissa bits. Exponent 0
    encodes subnormals m/8 * 2^-6. The variant has no infinities, and only
    exponent 15 with mantissa 7 is NaN, so the largest value is 448.
    """
    table = np.empty(256, dtype=np.float64)
    for code in range(256):
        sign = -1.0 if code & 0x80 else 1.0
        exponent = (code >> 3) & 0xF
        mantissa = code & 0x7
        if exponent == 0xF and mantissa == 0x7:
            table[code] = math.nan
        elif exponent == 0:
            table[code] = sign * math.ldexp(mantissa / 8.0, -6)
        else:
            table[code] = sign * math.ldexp(1.0 + mantissa / 8.0, exponent - 7)
    return table


FP8_E4M3_VALUES = build_fp8_e4m3_table()


def decode_tensor_bytes(raw, dtype):
    """Convert the raw little-endian bytes of a tensor to a flat float64 array."""
    if dtype == "F32":
        return np.frombuffer(raw, dtype="<f4").astype(np.float64)
    if dtype == "F16":
        return np.frombuffer(raw, dtype="<f2").astype(np.float64)
    if dtype == "BF16":
        # A bfloat16 is the top half of a float32, so shifting it up 16 bits
        # gives the same value exactly.
        wide = np.frombuffer(raw, dtype="<u2").astype(np.uint32) << 16
        return wide.view(np.float32).astype(np.float64)
    if dtype == "F8_E4M3":
        return FP8_E4M3_VALUES[np.frombuffer(raw, dtype=np.uint8)]
    raise AssertionError(dtype)


class Checkpoint:
    """The tensors of one layer directory, read lazily from its safetensors files."""

    def __init__(self, directory):
        single = os.path.join(directory, "model.safetensors")
        index_path = os.path.join(directory, "model.safetensors.index.json")
        self.entries = {}
        self.checked = set()  # names that passed require_tensor()
        if os.path.exists(single):
            self.entries = parse_safetensors_header(single)
            self.source = single
        elif os.path.exists(index_path):
            self.entries = self.read_sharded(directory, index_path)
            self.source = index_path
        else:
            raise InputError(f"{directory}: neither model.safetensors nor model.safetensors.index.json exists")

    @staticmethod
    def read_sharded(directory, index_path):
        index = load_json(index_path)
        weight_map = index.get("weight_map") if isinstance(index, dict) else None
        if not isinstance(weight_map, dict) or not weight_map:
            raise InputError(f"{index_path}: field weight_map is missing, empty or not an object")

        shard_headers = {}
        entries = {}
        for name, shard in weight_map.items():
            if not isinstance(shard, str) or shard in ("", ".", "..") or "/" in shard or "\\" in shard:
                raise InputError(
                    f"{index_path}: weight_map[{name!r}] = {shard!r} is not a file name in the same directory"
                )
            if shard not in shard_headers:
                shard_headers[shard] = parse_safetensors_header(os.path.join(directory, shard))
            shard_entries = shard_headers[shard]
            if name not in shard_entries:
                raise InputError(
                    f"{index_path}: weight_map puts tensor {name!r} in {shard}, but that file does not contain it"
                )
            entries[name] = shard_entries[name]
        return entries

    def names(self):
        return self.entries.keys()

    def shape(self, name):
        return self.entries[name].shape if name in self.entries else None

    def require_tensor(self, name, expected_shape):
        """Check that tensor `name` exists with this shape and a supported dtype.

        An F8_E4M3 tensor also needs its F32 block scale `name` + "_scale_inv".
        """
        entry = self.entries.get(name)
        if entry is None:
            raise InputError(f"{self.source}: tensor {name!r} not found")
        if entry.shape != tuple(expected_shape):
            raise InputError(
                f"{entry.path}: tensor {name!r} has shape {list(entry.shape)}, expected {list(expected_shape)}"
            )
        self.check_dtype_and_scale(name, entry)
        self.checked.add(name)

    def check_dtype_and_scale(self, name, entry):
        if entry.dtype not in ITEM_SIZES:
            raise InputError(
                f"{entry.path}: tensor {name!r}: dtype {entry.dtype} is not supported "
                f"(expected F32, BF16, F16 or F8_E4M3)"
            )

        scale_name = name + "_scale_inv"
        scale = self.entries.get(scale_name)
        if entry.dtype != "F8_E4M3":
            if scale is not None:
                raise InputError(
                    f"{scale.path}: tensor {scale_name!r} scales {name!r}, "
                    f"but that tensor is {entry.dtype}, not F8_E4M3"
                )
            return
        if len(entry.shape) != 2:
            raise InputError(
                f"{entry.path}: tensor {name!r}: F8_E4M3 tensor has shape {list(entry.shape)}, expected 2 dimensions"
            )
        if scale is None:
            raise InputError(f"{entry.path}: tensor {name!r} is F8_E4M3, but its scale {scale_name!r} is missing")
        if scale.dtype != "F32":
            raise InputError(f"{scale.path}: tensor {scale_name!r} is {scale.dtype}, expected F32")
        blocks = fp8_block_grid(entry.shape)
        if scale.shape != blocks:
            raise InputError(
                f"{scale.path}: tensor {scale_name!r} has shape {list(scale.shape)}, expected {list(blocks)} "
                f"(one per {FP8_BLOCK}x{FP8_BLOCK} block of {list(entry.shape)})"
            )

    def read_raw(self, entry):
        try:
            with open(entry.path, "rb") as f:
                f.seek(entry.offset)
                raw = f.read(entry.nbytes)
        except OSError as e:
            raise InputError(f"{entry.path}: cannot read tensor {entry.name!r}: {e.strerror}") from None
        if len(raw) != entry.nbytes:
            raise InputError(f"{entry.path}: tensor {entry.name!r}: file ends inside its data")
        return raw

    def load(self, name):
        """Return tensor `name` as a float64 torch tensor, dequantizing FP8.

        The tensor must have passed require_tensor() first.
        """
        if name not in self.checked:
            raise AssertionError(f"tensor {name!r} loaded before require_tensor() checked it")
        entry = self.entries[name]
        values = decode_tensor_bytes(self.read_raw(entry), entry.dtype).reshape(entry.shape)
        if entry.dtype == "F8_E4M3":
            scale_entry = self.entries[name + "_scale_inv"]
            scale = decode_tensor_bytes(self.read_raw(scale_entry), "F32").reshape(scale_entry.shape)
            rows, cols = entry.shape
            values = values * np.repeat(np.repeat(scale, FP8_BLOCK, axis=0), FP8_BLOCK, axis=1)[:rows, :cols]

        bad = np.flatnonzero(~np.isfinite(values))
        if bad.size:
            raise InputError(
                f"{entry.path}: tensor {name!r} has {bad.size} non-finite values "
                f"(first at flat index {bad[0]}: {values.flat[bad[0]]}), but a golden vector needs finite weights"
            )
        return torch.from_numpy(np.ascontiguousarray(values))


def fp8_block_grid(shape):
    """Return the shape of the block-scale grid of a 2-D FP8 tensor."""
    rows, cols = shape
    return (-(-rows // FP8_BLOCK), -(-cols // FP8_BLOCK))


# ---- config ------------------------------------------------------------------


@dataclasses.dataclass
class LayerSpec:
    """Routing parameters of one layer, read from config.json and checked per family."""

    family: str
    hidden: int
    ffn: int
    experts: int
    top_k: int
    renormalize: bool
    shared_ffn: int = 0  # width of the shared expert FFN, 0 when there is none
    n_group: int = 1
    topk_group: int = 1
    routed_scaling_factor: float = 1.0
    first_k_dense_replace: int = 0
    decoder_sparse_step: int = 1
    mlp_only_layers: tuple = ()
    dense_act_fn: str = ""  # Switch Transformers' expert activation, or "" for SwiGLU experts
    expert_capacity: int = -1  # assignments each expert keeps in token order, or -1 for no limit
    encoder_sparse_step: int = 0  # Switch Transformers: which encoder blocks are sparse
    sparse_step_field: str = ""  # the config field encoder_sparse_step came from
    aux_loss_coef: float = None  # router_aux_loss_coef, or None when absent
    z_loss_coef: float = None  # router_z_loss_coef, or None when absent


class ConfigReader:
    def __init__(self, path):
        self.path = path
        self.config = load_json(path)
        if not isinstance(self.config, dict):
            raise InputError(f"{path}: top level is a JSON {type(self.config).__name__}, expected an object")

    def value(self, field, default=None, required=True):
        if field in self.config:
            return self.config[field]
        if required:
            raise InputError(f"{self.path}: field {field} is missing")
        return default

    def integer(self, field, minimum=1, default=None, required=True):
        value = self.value(field, default, required)
        if not is_int(value) or value < minimum:
            raise InputError(f"{self.path}: field {field} = {value!r}, expected an integer >= {minimum}")
        return value

    def boolean(self, field):
        value = self.value(field)
        if not isinstance(value, bool):
            raise InputError(f"{self.path}: field {field} = {value!r}, expected true or false")
        return value

    def number(self, field):
        value = self.value(field)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
            raise InputError(f"{self.path}: field {field} = {value!r}, expected a finite number > 0")
        return float(value)

    def coefficient(self, field):
        """Return an optional loss coefficient, or None when it is missing or null."""
        value = self.value(field, default=None, required=False)
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
            raise InputError(f"{self.path}: field {field} = {value!r}, expected a finite number >= 0")
        return float(value)

    def int_list(self, field):
        value = self.value(field, default=[], required=False)
        if not isinstance(value, list) or not all(is_int(v) and v >= 0 for v in value):
            raise InputError(f"{self.path}: field {field} = {value!r}, expected a list of layer indices")
        return tuple(value)


def read_layer_spec(path):
    reader = ConfigReader(path)
    family = reader.value("model_type")
    if family not in FAMILIES:
        raise InputError(f"{path}: field model_type = {family!r}, expected one of {', '.join(FAMILIES)}")

    if family == "switch_transformers":
        spec = read_switch_spec(reader)
        spec.aux_loss_coef = reader.coefficient("router_aux_loss_coef")
        spec.z_loss_coef = reader.coefficient("router_z_loss_coef")
        return spec

    hidden = reader.integer("hidden_size")
    if family == "mixtral":
        spec = LayerSpec(
            family,
            hidden,
            ffn=reader.integer("intermediate_size"),
            experts=reader.integer("num_local_experts"),
            top_k=reader.integer("num_experts_per_tok"),
            renormalize=True,
        )
    elif family in ("qwen2_moe", "qwen3_moe"):
        # Qwen1.5-MoE-A2.7B's config.json has no mlp_only_layers, and the
        # transformers Qwen2MoeConfig defaults are [] and 1, used here too.
        spec = LayerSpec(
            family,
            hidden,
            ffn=reader.integer("moe_intermediate_size"),
            experts=reader.integer("num_experts"),
            top_k=reader.integer("num_experts_per_tok"),
            renormalize=reader.boolean("norm_topk_prob"),
            shared_ffn=reader.integer("shared_expert_intermediate_size") if family == "qwen2_moe" else 0,
            decoder_sparse_step=reader.integer("decoder_sparse_step", default=1, required=False),
            mlp_only_layers=reader.int_list("mlp_only_layers"),
        )
    elif family == "olmoe":
        spec = LayerSpec(
            family,
            hidden,
            ffn=reader.integer("intermediate_size"),
            experts=reader.integer("num_experts"),
            top_k=reader.integer("num_experts_per_tok"),
            renormalize=reader.boolean("norm_topk_prob"),
        )
    else:
        spec = read_deepseek_v3_spec(reader, hidden)

    if spec.top_k > spec.experts:
        raise InputError(f"{path}: num_experts_per_tok = {spec.top_k} exceeds the {spec.experts} experts")
    spec.aux_loss_coef = reader.coefficient("router_aux_loss_coef")
    spec.z_loss_coef = reader.coefficient("router_z_loss_coef")
    return spec


def read_switch_spec(reader):
    """Read a Switch Transformers config (SwitchTransformersConfig of transformers).

    The router selects one expert, and its weight is that expert's softmax
    probability. Only encoder blocks are read, so only the encoder fields
    count.
    """
    path = reader.path
    # As in moe-ep, a null field counts as absent.
    router_bias = reader.value("router_bias", default=None, required=False)
    if router_bias is not None and router_bias is not False:
        raise InputError(f"{path}: field router_bias = {router_bias!r}, but only false is supported")
    router_dtype = reader.value("router_dtype", default=None, required=False)
    if router_dtype is not None and router_dtype != "float32":
        raise InputError(f"{path}: field router_dtype = {router_dtype!r}, but only 'float32' is supported")
    selected = reader.value("num_selected_experts", default=None, required=False)
    if selected is not None and (isinstance(selected, bool) or not isinstance(selected, (int, float)) or selected != 1):
        raise InputError(f"{path}: field num_selected_experts = {selected!r}, but the Switch router selects 1 expert")
    activation = reader.value("dense_act_fn", default=None, required=False)
    if activation is None:
        activation = "relu"  # SwitchTransformersConfig's default
    if activation not in DENSE_ACTIVATIONS:
        raise InputError(
            f"{path}: field dense_act_fn = {activation!r}, expected one of {', '.join(DENSE_ACTIVATIONS)}"
        )

    num_layers = reader.integer("num_layers")
    # transformers computes num_layers // num_sparse_encoder_layers (0 when
    # there are no sparse layers), but a config.json that sets
    # encoder_sparse_step overrides it, because PretrainedConfig sets every
    # extra key as an attribute after SwitchTransformersConfig.__init__ ran.
    if reader.value("encoder_sparse_step", default=None, required=False) is not None:
        step_field = "encoder_sparse_step"
        step = reader.integer(step_field, minimum=0)
    else:
        step_field = "num_sparse_encoder_layers"
        sparse_layers = 3  # SwitchTransformersConfig's default
        if reader.value(step_field, default=None, required=False) is not None:
            sparse_layers = reader.integer(step_field, minimum=0)
        step = num_layers // sparse_layers if sparse_layers > 0 else 0

    return LayerSpec(
        "switch_transformers",
        hidden=reader.integer("d_model"),
        ffn=reader.integer("d_ff"),
        experts=reader.integer("num_experts"),
        top_k=1,
        renormalize=False,
        dense_act_fn=activation,
        expert_capacity=reader.integer("expert_capacity", minimum=0),
        encoder_sparse_step=step,
        sparse_step_field=step_field,
    )


def read_deepseek_v3_spec(reader, hidden):
    path = reader.path
    for field, expected in (("scoring_func", "sigmoid"), ("topk_method", "noaux_tc")):
        value = reader.value(field, default=expected, required=False)
        if value != expected:
            raise InputError(f"{path}: field {field} = {value!r}, but only {expected!r} is supported")
    moe_layer_freq = reader.integer("moe_layer_freq", default=1, required=False)
    if moe_layer_freq != 1:
        raise InputError(
            f"{path}: field moe_layer_freq = {moe_layer_freq}, but only 1 (every layer after the dense ones) "
            f"is supported"
        )

    ffn = reader.integer("moe_intermediate_size")
    spec = LayerSpec(
        "deepseek_v3",
        hidden,
        ffn=ffn,
        experts=reader.integer("n_routed_experts"),
        top_k=reader.integer("num_experts_per_tok"),
        renormalize=reader.boolean("norm_topk_prob"),
        shared_ffn=ffn * reader.integer("n_shared_experts", minimum=0),
        n_group=reader.integer("n_group"),
        topk_group=reader.integer("topk_group"),
        routed_scaling_factor=reader.number("routed_scaling_factor"),
        first_k_dense_replace=reader.integer("first_k_dense_replace", minimum=0),
    )
    if spec.experts % spec.n_group != 0:
        raise InputError(f"{path}: n_routed_experts = {spec.experts} is not a multiple of n_group = {spec.n_group}")
    group_size = spec.experts // spec.n_group
    if group_size < 2:
        raise InputError(
            f"{path}: n_routed_experts / n_group = {group_size}, but a group score sums the two largest "
            f"scores of a group, so groups need at least 2 experts"
        )
    if spec.topk_group > spec.n_group:
        raise InputError(f"{path}: topk_group = {spec.topk_group} exceeds n_group = {spec.n_group}")
    if spec.top_k > spec.topk_group * group_size:
        raise InputError(
            f"{path}: num_experts_per_tok = {spec.top_k} exceeds the {spec.topk_group * group_size} experts "
            f"of the topk_group = {spec.topk_group} groups kept"
        )
    return spec


def dense_layer_reason(spec, layer):
    """Return why `layer` has a dense MLP in place of experts, or None."""
    if spec.family == "switch_transformers":
        # SwitchTransformersStack: every block is sparse for a step of 1, and
        # for a larger step the blocks B with B mod step = 1.
        step = spec.encoder_sparse_step
        if step == 1 or (step > 1 and layer % step == 1):
            return None
        return f"encoder block {layer} is not sparse with encoder_sparse_step = {step} (from {spec.sparse_step_field})"
    if spec.family == "deepseek_v3" and layer < spec.first_k_dense_replace:
        return f"layer {layer} < first_k_dense_replace = {spec.first_k_dense_replace}"
    if spec.family in ("qwen2_moe", "qwen3_moe"):
        if layer in spec.mlp_only_layers:
            return f"layer {layer} is in mlp_only_layers = {list(spec.mlp_only_layers)}"
        if (layer + 1) % spec.decoder_sparse_step != 0:
            return f"layer {layer} + 1 is not a multiple of decoder_sparse_step = {spec.decoder_sparse_step}"
    return None


# ---- tensor names --------------------------------------------------------------


@dataclasses.dataclass
class LayerTensors:
    module: str  # name prefix of the MoE module, ending in "."
    gate: str
    gate_bias: str  # DeepSeek-V3's e_score_correction_bias, or "" for other families
    expert_prefix: str  # the expert index and the projection names follow it
    projections: tuple  # (gate, up, down) projections of a SwiGLU expert, or (wi, wo) of a dense one
    shared: tuple  # names of the shared FFN (gate, up, down), or () for none
    shared_gate: str  # Qwen2-MoE's sigmoid gate of the shared expert, or ""
    dense_marker: str  # a tensor that exists when the layer has a dense MLP instead

    def expert(self, e):
        return tuple(f"{self.expert_prefix}{e}.{p}.weight" for p in self.projections)


def layer_tensor_names(spec, layer):
    if spec.family == "switch_transformers":
        moe = f"encoder.block.{layer}.layer.1.mlp"
        return LayerTensors(
            f"{moe}.", f"{moe}.router.classifier.weight", "", f"{moe}.experts.expert_", ("wi", "wo"), (), "",
            f"{moe}.wi.weight",
        )

    p = f"model.layers.{layer}"
    dense = f"{p}.mlp.gate_proj.weight"
    if spec.family == "mixtral":
        moe = f"{p}.block_sparse_moe"
        return LayerTensors(f"{moe}.", f"{moe}.gate.weight", "", f"{moe}.experts.", ("w1", "w3", "w2"), (), "", dense)

    swiglu = ("gate_proj", "up_proj", "down_proj")
    shared, shared_gate, bias = (), "", ""
    if spec.family == "qwen2_moe":
        shared = tuple(f"{p}.mlp.shared_expert.{n}.weight" for n in swiglu)
        shared_gate = f"{p}.mlp.shared_expert_gate.weight"
    elif spec.family == "deepseek_v3":
        bias = f"{p}.mlp.gate.e_score_correction_bias"
        if spec.shared_ffn > 0:
            shared = tuple(f"{p}.mlp.shared_experts.{n}.weight" for n in swiglu)
    return LayerTensors(
        f"{p}.mlp.", f"{p}.mlp.gate.weight", bias, f"{p}.mlp.experts.", swiglu, shared, shared_gate, dense
    )


DECODER_LAYER_NAME = re.compile(r"^model\.layers\.(\d+)\.")
ENCODER_BLOCK_NAME = re.compile(r"^encoder\.block\.(\d+)\.")


def pick_layer(checkpoint, spec, requested):
    if spec.family == "switch_transformers":
        pattern, prefix = ENCODER_BLOCK_NAME, "encoder.block"
    else:
        pattern, prefix = DECODER_LAYER_NAME, "model.layers"
    found = sorted({int(m.group(1)) for m in map(pattern.match, checkpoint.names()) if m})
    if requested is not None:
        if requested not in found:
            raise InputError(
                f"{checkpoint.source}: no tensor {prefix}.{requested}.* found (layers present: {found})"
            )
        return requested
    if len(found) != 1:
        raise InputError(
            f"{checkpoint.source}: tensors of {len(found)} layers {found} are present; pass --layer to pick one"
        )
    return found[0]


def check_layer_tensors(checkpoint, spec, layer, names):
    """Check every tensor the layer needs (shape, dtype, FP8 scale) and reject any other.

    Only tensors under the MoE module (model.layers.L.mlp or .block_sparse_moe)
    are checked, so a directory may also contain the layer's attention weights.
    """
    h, f, e = spec.hidden, spec.ffn, spec.experts
    if checkpoint.shape(names.gate) is None and checkpoint.shape(names.dense_marker) is not None:
        raise InputError(
            f"{checkpoint.source}: layer {layer} is a dense MLP layer ({names.dense_marker} exists), not an MoE layer"
        )
    checkpoint.require_tensor(names.gate, (e, h))
    if names.gate_bias:
        checkpoint.require_tensor(names.gate_bias, (e,))
    # Every projection but the last maps H to F; the last maps F back to H.
    shapes = [(f, h)] * (len(names.projections) - 1) + [(h, f)]
    for expert in range(e):
        for name, shape in zip(names.expert(expert), shapes):
            checkpoint.require_tensor(name, shape)
    if names.shared:
        checkpoint.require_tensor(names.shared[0], (spec.shared_ffn, h))
        checkpoint.require_tensor(names.shared[1], (spec.shared_ffn, h))
        checkpoint.require_tensor(names.shared[2], (h, spec.shared_ffn))
    if names.shared_gate:
        checkpoint.require_tensor(names.shared_gate, (1, h))

    # Every tensor under the MoE module must be one of those checked above,
    # so that a config that disagrees with the tensors (more experts, a
    # shared expert the family lacks) fails here instead of being ignored.
    for name in checkpoint.names():
        if name.startswith(names.module) and name not in checkpoint.checked:
            base = name.removesuffix("_scale_inv")
            if base == name or base not in checkpoint.checked:
                raise InputError(
                    f"{checkpoint.source}: tensor {name!r} is not part of a {spec.family} MoE layer "
                    f"with {e} experts as config.json describes it"
                )


# ---- math ----------------------------------------------------------------------


def select_top(scores, count):
    """Return (indices, sorted scores) of the `count` largest scores per row.

    A stable sort in descending order keeps equal scores in index order, so on
    a tie the lower index comes first and wins the last place.
    """
    order = torch.sort(scores, dim=1, descending=True, stable=True)
    return order.indices[:, :count], order.values


def boundary_gap(sorted_scores, k):
    """Return (min gap, token) between the k-th and (k+1)-th sorted scores.

    The gap is +inf when no (k+1)-th score exists or it is -inf (excluded).
    """
    if sorted_scores.shape[1] <= k:
        return math.inf, None
    gaps = sorted_scores[:, k - 1] - sorted_scores[:, k]
    token = int(torch.argmin(gaps))
    if math.isinf(gaps[token]):
        return math.inf, None
    return float(gaps[token]), token


def route_softmax(spec, logits):
    """Mixtral, Qwen2-MoE, Qwen3-MoE and OLMoE: softmax over all experts, top-k."""
    probs = torch.softmax(logits, dim=1)
    ids, sorted_probs = select_top(probs, spec.top_k)
    weights = torch.gather(probs, 1, ids)
    if spec.renormalize:
        weights = weights / weights.sum(dim=1, keepdim=True)
    return ids, weights, {"expert": boundary_gap(sorted_probs, spec.top_k)}


def route_deepseek_v3(spec, logits, correction_bias):
    """DeepSeek-V3: sigmoid scores, biased group-limited top-k, unbiased weights."""
    tokens = logits.shape[0]
    scores = torch.sigmoid(logits)
    biased = scores + correction_bias.unsqueeze(0)

    group_size = spec.experts // spec.n_group
    grouped = biased.view(tokens, spec.n_group, group_size)
    two_largest = torch.sort(grouped, dim=2, descending=True).values[:, :, :2]
    group_scores = two_largest.sum(dim=2)
    kept_groups, sorted_group_scores = select_top(group_scores, spec.topk_group)

    keep = torch.zeros(tokens, spec.n_group, dtype=torch.bool)
    keep.scatter_(1, kept_groups, True)
    keep = keep.unsqueeze(2).expand(tokens, spec.n_group, group_size).reshape(tokens, spec.experts)
    choice = biased.masked_fill(~keep, -math.inf)

    ids, sorted_choice = select_top(choice, spec.top_k)
    weights = torch.gather(scores, 1, ids)
    if spec.renormalize:
        weights = weights / weights.sum(dim=1, keepdim=True)
    weights = weights * spec.routed_scaling_factor
    gaps = {
        "expert": boundary_gap(sorted_choice, spec.top_k),
        "group": boundary_gap(sorted_group_scores, spec.topk_group),
    }
    return ids, weights, gaps


def keep_by_position(ids, experts, capacity):
    """Return (T, K) bools: an assignment is kept when fewer than `capacity`
    assignments to the same expert come before it in token order (and, within
    a token, slot order). The whole batch counts as one sequence. A negative
    capacity keeps everything."""
    if capacity < 0:
        return torch.ones(ids.shape, dtype=torch.bool)
    flat = ids.reshape(-1)
    one_hot = torch.nn.functional.one_hot(flat.long(), experts)
    # The 1-based position of each assignment among those of its expert.
    position = torch.cumsum(one_hot, dim=0).gather(1, flat.long().unsqueeze(1)).squeeze(1)
    return (position <= capacity).reshape(ids.shape)


def swiglu_ffn(x, w_gate, w_up, w_down):
    """FFN(x) = W_down (silu(W_gate x) * (W_up x)), with silu(v) = v * sigmoid(v)."""
    gate = x @ w_gate.T
    return ((gate * torch.sigmoid(gate)) * (x @ w_up.T)) @ w_down.T


def dense_ffn(activation, x, wi, wo):
    """Switch Transformers' expert: FFN(x) = wo act(wi x)."""
    return DENSE_ACTIVATIONS[activation](x @ wi.T) @ wo.T


def aux_losses(spec, logits, ids):
    """Return the router's (load-balancing loss, z-loss) in float64.

    load balance = E * sum_e f_e * P_e, where f_e is the fraction of the T*K
    assignments routed to expert e, counted before any drop, and P_e is the
    mean over tokens of softmax(logits)_e, whatever the family's scoring.
    z-loss = the mean over tokens of logsumexp(logits)^2.
    """
    tokens, experts = logits.shape
    counts = torch.bincount(ids.reshape(-1).long(), minlength=experts).to(torch.float64)
    fraction = counts / (tokens * spec.top_k)
    mean_prob = torch.softmax(logits, dim=1).mean(dim=0)
    load_balance = experts * float(torch.sum(fraction * mean_prob))
    z_loss = float(torch.mean(torch.logsumexp(logits, dim=1) ** 2))
    return load_balance, z_loss


def compute_layer(checkpoint, spec, names, x):
    """Return (output (T, H), expert ids (T, K), kept (T, K), gaps, aux losses) in float64."""
    logits = x @ checkpoint.load(names.gate).T
    if spec.family == "deepseek_v3":
        ids, weights, gaps = route_deepseek_v3(spec, logits, checkpoint.load(names.gate_bias))
    else:
        # Switch Transformers is the top-1 case: its weight is the largest
        # probability, and a tie goes to the lower index as with torch.argmax.
        ids, weights, gaps = route_softmax(spec, logits)
    kept = keep_by_position(ids, spec.experts, spec.expert_capacity)

    # Loading one expert at a time keeps memory at one expert's float64
    # weights, and experts that no token selected are never read. A dropped
    # assignment adds nothing, so a token with no kept assignment outputs 0.
    out = torch.zeros_like(x)
    for expert in torch.unique(ids[kept]).tolist():
        token_idx, slot = torch.nonzero((ids == expert) & kept, as_tuple=True)
        weights_e = [checkpoint.load(n) for n in names.expert(expert)]
        if spec.dense_act_fn:
            y = dense_ffn(spec.dense_act_fn, x[token_idx], *weights_e)
        else:
            y = swiglu_ffn(x[token_idx], *weights_e)
        out.index_add_(0, token_idx, y * weights[token_idx, slot].unsqueeze(1))

    if names.shared:
        shared = swiglu_ffn(x, *(checkpoint.load(n) for n in names.shared))
        if names.shared_gate:
            shared = shared * torch.sigmoid(x @ checkpoint.load(names.shared_gate).T)
        out = out + shared
    return out, ids, kept, gaps, aux_losses(spec, logits, ids)


# ---- files ---------------------------------------------------------------------


def load_tokens(path, hidden):
    try:
        tokens = np.load(path, allow_pickle=False)
    except FileNotFoundError:
        raise InputError(f"{path}: file not found") from None
    except (OSError, ValueError) as e:
        raise InputError(f"{path}: not a readable .npy file: {e}") from None
    if tokens.dtype != np.dtype("<f4"):
        raise InputError(f"{path}: dtype {tokens.dtype.str}, expected '<f4' (float32)")
    if tokens.ndim != 2 or tokens.shape[0] < 1 or tokens.shape[1] != hidden:
        raise InputError(f"{path}: shape {tokens.shape}, expected (T, {hidden}) with T >= 1 (hidden_size = {hidden})")
    bad = np.flatnonzero(~np.isfinite(tokens))
    if bad.size:
        raise InputError(
            f"{path}: {bad.size} non-finite values (first at flat index {bad[0]}), "
            f"but a golden vector needs finite tokens"
        )
    return torch.from_numpy(tokens.astype(np.float64))


def save_files_atomic(files):
    """Write each (path, content) through a temporary file, then rename them all.

    A content is a numpy array, saved as .npy, or bytes, written as they are.
    Renaming only after every temporary file is complete means a failed write
    leaves the old outputs, if any, in place.
    """
    written = []
    try:
        for path, content in files:
            suffix = os.path.splitext(path)[1]
            fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=suffix, dir=os.path.dirname(path) or ".")
            written.append(tmp)
            # mkstemp creates the file 0600; give it the mode a plain
            # open() would, 0666 less the umask.
            umask = os.umask(0)
            os.umask(umask)
            os.fchmod(fd, 0o666 & ~umask)
            with os.fdopen(fd, "wb") as f:
                if isinstance(content, bytes):
                    f.write(content)
                else:
                    np.save(f, content, allow_pickle=False)
                f.flush()
                os.fsync(f.fileno())
        for (path, _), tmp in zip(files, written):
            os.replace(tmp, path)
    finally:
        for tmp in written:
            if os.path.exists(tmp):
                os.unlink(tmp)


# ---- driver --------------------------------------------------------------------


def aux_losses_json(spec, losses):
    """Return expected_aux_losses.json: the two losses, the config's
    coefficients (null when absent) and each loss times its coefficient."""
    load_balance, z_loss = losses

    def scaled(value, coef):
        return None if coef is None else value * coef

    record = {
        "load_balance": load_balance,
        "z_loss": z_loss,
        "router_aux_loss_coef": spec.aux_loss_coef,
        "router_z_loss_coef": spec.z_loss_coef,
        "load_balance_scaled": scaled(load_balance, spec.aux_loss_coef),
        "z_loss_scaled": scaled(z_loss, spec.z_loss_coef),
    }
    return (json.dumps(record, indent=2) + "\n").encode("utf-8")


def format_gap(label, gap):
    value, token = gap
    if token is None:
        return f"  min gap between {label}: none (every score is selected or excluded)"
    return f"  min gap between {label}: {value:.3e} (token {token})"


def process_layer_dir(directory, requested_layer, min_gap):
    """Compute and write one directory's golden vectors.

    Return 0, or 1 when the layer is too close to a tie and nothing was written.
    """
    spec = read_layer_spec(os.path.join(directory, "config.json"))
    checkpoint = Checkpoint(directory)
    layer = pick_layer(checkpoint, spec, requested_layer)
    reason = dense_layer_reason(spec, layer)
    if reason:
        raise InputError(f"{directory}/config.json: {reason}, so it is a dense MLP layer, not an MoE layer")
    names = layer_tensor_names(spec, layer)
    check_layer_tensors(checkpoint, spec, layer, names)
    x = load_tokens(os.path.join(directory, "tokens.npy"), spec.hidden)

    out, ids, kept, gaps, losses = compute_layer(checkpoint, spec, names, x)

    k = spec.top_k
    print(f"{directory}: {spec.family} layer {layer}, {x.shape[0]} tokens, top-{k} of {spec.experts} experts")
    print(format_gap(f"selection scores {k} and {k + 1}", gaps["expert"]))
    if "group" in gaps:
        print(format_gap(f"group scores {spec.topk_group} and {spec.topk_group + 1}", gaps["group"]))
    if spec.expert_capacity >= 0:
        dropped = int((~kept).sum())
        print(f"  expert capacity {spec.expert_capacity}: {dropped} of {kept.numel()} assignments dropped")
    print(f"  load-balancing loss {losses[0]!r}, z-loss {losses[1]!r}")

    too_close = [(kind, gap) for kind, gap in gaps.items() if gap[0] < min_gap]
    if too_close:
        for kind, (value, token) in too_close:
            print(
                f"{directory}: error: {kind} selection gap {value:.3e} at token {token} is below {min_gap:g}, "
                f"so fp32 rounding could change the selection. No files were written.",
                file=sys.stderr,
            )
        return 1

    files = [
        (os.path.join(directory, "expected_output.npy"), out.numpy().astype("<f8")),
        (os.path.join(directory, "expected_topk_ids.npy"), ids.numpy().astype("<i4")),
        (os.path.join(directory, "expected_aux_losses.json"), aux_losses_json(spec, losses)),
    ]
    if spec.expert_capacity >= 0:
        files.append((os.path.join(directory, "expected_kept.npy"), kept.numpy().astype("|b1")))
    save_files_atomic(files)
    print(f"  wrote {', '.join(os.path.basename(path) for path, _ in files)}")
    return 0


def parse_args(argv):
    parser = argparse.ArgumentParser(
        description="Write float64 golden vectors (expected_output.npy, expected_topk_ids.npy, "
        "expected_aux_losses.json and, with a capacity, expected_kept.npy) for one MoE layer in each LAYER_DIR."
    )
    parser.add_argument(
        "layer_dirs", nargs="+", metavar="LAYER_DIR", help="directory with config.json, safetensors and tokens.npy"
    )
    parser.add_argument(
        "--layer",
        type=int,
        help="layer index L of the tensors model.layers.L.*, or encoder.block.L.* for switch_transformers "
        "(default: the only layer present)",
    )
    parser.add_argument(
        "--min-gap",
        type=float,
        default=DEFAULT_MIN_GAP,
        help=f"smallest allowed gap between the K-th and (K+1)-th selection score (default {DEFAULT_MIN_GAP:g})",
    )
    args = parser.parse_args(argv)
    if args.layer is not None and args.layer < 0:
        parser.error(f"--layer {args.layer}: expected a layer index >= 0")
    if not math.isfinite(args.min_gap) or args.min_gap < 0:
        parser.error(f"--min-gap {args.min_gap}: expected a finite number >= 0")
    return args


def main(argv):
    args = parse_args(argv)
    status = 0
    for directory in args.layer_dirs:
        try:
            status = max(status, process_layer_dir(directory, args.layer, args.min_gap))
        except InputError as e:
            print(f"torch_reference.py: error: {e}", file=sys.stderr)
            status = max(status, 2)
        except OSError as e:
            print(f"torch_reference.py: error: {directory}: cannot write output: {e}", file=sys.stderr)
            status = 3
    return status


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

"""The text-generation convention of Triton's LLM backends, mapped onto a loraplex GenerateCall.

Inputs: BYTES `text_input` (one element, shape [1] or [1, 1]); optional scalars `max_tokens`,
`temperature`, `top_p`, `top_k`, `seed`, `ignore_eos`, `stream` and `exclude_input_in_output`,
each as an input tensor or as a request parameter of the same name. Output: BYTES
`text_output`, shaped like `text_input`. As in Triton's vLLM backend, a non-streamed
`text_output` starts with the prompt unless `exclude_input_in_output` is true; streamed
responses carry only the new text.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from loraplex.v1 import kserve_v2_pb2 as pb

from .generate_request import ApiError, GenerateCall
from .model_names import Model
from .kserve_tensors import NUMERIC, Tensor, read_inputs, shown

TEXT_INPUT = "text_input"
TEXT_OUTPUT = "text_output"
INTEGER_TYPES = tuple(t for t in NUMERIC if t.startswith(("INT", "UINT")))
FLOAT_TYPES = ("FP32", "FP64", *INTEGER_TYPES)
# optional scalar inputs: name -> (accepted datatypes, python type, sampling field or None)
SCALARS: dict[str, tuple[tuple[str, ...], type, str | None]] = {
    "max_tokens": (INTEGER_TYPES, int, "max_new_tokens"),
    "temperature": (FLOAT_TYPES, float, "temperature"),
    "top_p": (FLOAT_TYPES, float, "top_p"),
    "top_k": (INTEGER_TYPES, int, "top_k"),
    "seed": (INTEGER_TYPES, int, "seed"),
    "ignore_eos": (("BOOL",), bool, "ignore_eos"),
    "stream": (("BOOL",), bool, None),
    "exclude_input_in_output": (("BOOL",), bool, None),
}
PARAMETER_KINDS = {bool: ("bool_param",), int: ("int64_param", "uint64_param"),
                   float: ("double_param", "int64_param", "uint64_param")}
EMPTY_FINAL = "triton_enable_empty_final_response"  # tritonclient's flag for a content-free last response


@dataclass
class TextGeneration:
    prompt: str
    text_shape: list[int]
    sampling: dict[str, Any] = field(default_factory=dict)  # sampling fields the client set (GenerateCall.sampling)
    stream: bool = False
    exclude_input: bool = False
    empty_final: bool = False


INPUTS_METADATA = [
    pb.ModelMetadataResponse.TensorMetadata(name=TEXT_INPUT, datatype="BYTES", shape=[1]),
    pb.ModelMetadataResponse.TensorMetadata(name="max_tokens", datatype="INT32", shape=[1]),
    pb.ModelMetadataResponse.TensorMetadata(name="temperature", datatype="FP32", shape=[1]),
    pb.ModelMetadataResponse.TensorMetadata(name="top_p", datatype="FP32", shape=[1]),
    pb.ModelMetadataResponse.TensorMetadata(name="top_k", datatype="INT32", shape=[1]),
    pb.ModelMetadataResponse.TensorMetadata(name="seed", datatype="INT64", shape=[1]),
    pb.ModelMetadataResponse.TensorMetadata(name="ignore_eos", datatype="BOOL", shape=[1]),
    pb.ModelMetadataResponse.TensorMetadata(name="stream", datatype="BOOL", shape=[1]),
    pb.ModelMetadataResponse.TensorMetadata(name="exclude_input_in_output", datatype="BOOL", shape=[1]),
]
OUTPUTS_METADATA = [pb.ModelMetadataResponse.TensorMetadata(name=TEXT_OUTPUT, datatype="BYTES", shape=[-1])]


def parse(request: pb.ModelInferRequest) -> TextGeneration:
    """Check a ModelInferRequest against the convention and collect what it asks for."""
    tensors = read_inputs(request)
    known = ", ".join([TEXT_INPUT, *SCALARS])
    for name in tensors:
        if name != TEXT_INPUT and name not in SCALARS:
            raise ApiError("INVALID_ARGUMENT", f"unknown input {name!r}; this model takes {known}")
    for out in request.outputs:
        if out.name != TEXT_OUTPUT:
            raise ApiError("INVALID_ARGUMENT", f"unknown output {out.name!r}; this model produces {TEXT_OUTPUT}")
    if TEXT_INPUT not in tensors:
        raise ApiError("INVALID_ARGUMENT", f"the request has no {TEXT_INPUT} input (BYTES, shape [1])")
    gen = TextGeneration(prompt=_prompt(tensors[TEXT_INPUT]), text_shape=tensors[TEXT_INPUT].shape)
    values = _parameters(request)
    for name in SCALARS:
        if name in tensors:
            if name in values:
                raise ApiError("INVALID_ARGUMENT", f"{name} is given both as an input and as a parameter")
            values[name] = _scalar(tensors[name])
    for name, value in values.items():
        target = SCALARS[name][2]
        if target is not None:
            gen.sampling[target] = value
    gen.stream = values.get("stream", False)
    gen.exclude_input = values.get("exclude_input_in_output", False)
    gen.empty_final = _flag(request, EMPTY_FINAL)
    return gen


def _prompt(tensor: Tensor) -> str:
    if tensor.datatype != "BYTES":
        raise ApiError("INVALID_ARGUMENT", f"{TEXT_INPUT} must be BYTES, got {tensor.datatype}")
    if len(tensor.values) != 1 or len(tensor.shape) not in (1, 2):
        raise ApiError("INVALID_ARGUMENT", f"{TEXT_INPUT} must hold one prompt (shape [1] or [1, 1]), "
                                           f"got shape {shown(tensor.shape)}")
    try:
        return tensor.values[0].decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ApiError("INVALID_ARGUMENT", f"{TEXT_INPUT} is not valid UTF-8: {exc}") from None


def _scalar(tensor: Tensor) -> Any:
    datatypes, kind, _ = SCALARS[tensor.name]
    if tensor.datatype not in datatypes:
        raise ApiError("INVALID_ARGUMENT", f"input {tensor.name!r} must be one of {', '.join(datatypes)}, "
                                           f"got {tensor.datatype}")
    if len(tensor.values) != 1:
        raise ApiError("INVALID_ARGUMENT", f"input {tensor.name!r} must hold one value, "
                                           f"got shape {shown(tensor.shape)}")
    return kind(tensor.values[0])


def _parameters(request: pb.ModelInferRequest) -> dict[str, Any]:
    """The generation settings given as request parameters; Triton's own (triton_*) are read elsewhere."""
    values: dict[str, Any] = {}
    for key, param in request.parameters.items():
        if key.startswith("triton_"):
            continue
        if key not in SCALARS:
            raise ApiError("INVALID_ARGUMENT", f"unknown request parameter {key!r}; this model takes "
                                               f"{', '.join(SCALARS)}")
        which = param.WhichOneof("parameter_choice")
        kind = SCALARS[key][1]
        if which not in PARAMETER_KINDS[kind]:
            raise ApiError("INVALID_ARGUMENT", f"request parameter {key!r} must be a {kind.__name__}, "
                                               f"got {which or 'no value'}")
        values[key] = kind(getattr(param, which))
    return values


def _flag(request: pb.ModelInferRequest, key: str) -> bool:
    param = request.parameters.get(key)
    return param is not None and param.WhichOneof("parameter_choice") == "bool_param" and param.bool_param


def generate_call(gen: TextGeneration, model: Model) -> GenerateCall:
    """The generation call that serves `gen` on `model`: the one validation path does the rest."""
    names = {"endpoint": "endpoint", "lora": "adapter", "soft_prompt": "soft_prompt"}
    target = {names[model.kind]: model.name if model.kind == "endpoint" else model.ref} if model.kind in names else {}
    return GenerateCall(prompt=gen.prompt, sampling=dict(gen.sampling), **target)

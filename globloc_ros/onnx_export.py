"""A model file (.pt) -> ONNX graph of PoseGraph, and the names and metadata every exported graph carries.

The runtime exports its onnxruntime cache with this (runtime.cached_onnx); `globloc export` (globloc/export.py)
builds on it: the check against PyTorch, TorchScript modules and TensorRT engines. The runtime imports this
module, never the reverse, and it imports neither rclpy nor the offline package.

The graph is globloc_ros.net.PoseGraph: image (B, 3, H, W) float RGB 0..255 at the model's fixed input size,
K (B, 3, 3) of that image and depth (B, 1, H/8, W/8) metres at the cells (0: not measured, the depth head's depth
is used) -> T_map_cam (B, 4, 4), residual (B,), n_eff (B,), spread (B,); network, camera coordinates from depth
and Horn alignment all inside. Batch is fixed at 1 unless dynamic_batch.

ONNX exporter: the TorchScript-based one (dynamo=False, opset 17). Measured on the default 320x240 network:
it exports in 0.3 s with 418 non-Constant nodes; the dynamo exporter takes 5.5 s and gives 359 nodes (no
Identity/Expand, squares as Pow). Both use only ops TensorRT >= 8.6 parses, and align.py was made
export-clean against the TorchScript one (test_align.py), so the faster exporter wins: the runtime exports
the ONNX cache at first start and the tests export several times. Every graph passes onnx.checker and the
TensorRT allow-list below before it is returned.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import warnings
from collections import Counter
from pathlib import Path

import torch

from globloc_ros.modelfile import FORMAT_VERSION, load_model
from globloc_ros.net import NetConfig, PoseGraph

OPSET = 17
GRAPH_FORMAT = 'globloc-pose-graph'  # ONNX / TorchScript graphs of PoseGraph
EXPORT_VERSION = 2  # layout of the exported graph and its metadata; bump when inputs/outputs change
INPUT_NAMES = ('image', 'K', 'depth')
OUTPUT_NAMES = ('T_map_cam', 'residual', 'n_eff', 'spread')

# ONNX ops seen in our PoseGraph exports (fixed and dynamic batch, both exporters) that TensorRT's ONNX parser
# supports (onnx-tensorrt docs/operators.md; IsInf needs TensorRT >= 8.6; GroupNorm exports as Reshape +
# InstanceNormalization; Resize is the mobilenet_v2 backbone's bilinear upsampling, half_pixel coordinates).
# Anything else is refused, in particular the decompositions (Svd, Eig, Inverse, Det) and control flow (If, Loop,
# Scan) whose trip counts or branches depend on data.
TENSORRT_OPS = frozenset({
    'Add', 'And', 'ArgMax', 'Cast', 'Clip', 'Concat', 'Constant', 'ConstantOfShape', 'Conv', 'Div', 'Equal',
    'Expand', 'Flatten', 'Gather', 'Greater', 'Identity', 'InstanceNormalization', 'IsInf', 'IsNaN', 'MatMul',
    'Mul', 'Neg', 'Not', 'Or', 'Pow', 'Range', 'Reciprocal', 'ReduceMin', 'ReduceSum', 'Relu', 'Reshape', 'Resize',
    'Shape', 'Slice', 'Softmax', 'Softplus', 'Split', 'Sqrt', 'Squeeze', 'Sub', 'Transpose', 'Unsqueeze', 'Where',
})


class UnsupportedOpError(ValueError):
    """A graph with an op that TensorRT's ONNX parser cannot run (or that ONNX cannot express)."""


def file_sha256(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, 'rb') as f:
        for chunk in iter(lambda: f.read(1 << 20), b''):
            h.update(chunk)
    return h.hexdigest()


def graph_metadata(config: dict, model_sha256: str, dynamic_batch: bool = False) -> dict[str, str]:
    """String key/values stored with every exported graph (ONNX metadata_props, TorchScript extra file,
    beside a TensorRT engine). `config` is NetConfig.to_dict() of the model; values are JSON.
    runtime.check_graph_metadata reads them back."""
    W, H = config['input_size']
    return {
        'globloc.format': GRAPH_FORMAT,
        'globloc.export_version': str(EXPORT_VERSION),
        'globloc.model_format_version': str(FORMAT_VERSION),
        'globloc.input_size': json.dumps([int(W), int(H)]),  # (W, H) pixels
        'globloc.normalisation': json.dumps({'mean': list(config['mean']), 'std': list(config['std']),
                                             'input': 'RGB float 0..255', 'applied': 'inside the graph'}),
        'globloc.scene': json.dumps({'centre': list(config['scene_centre']), 'scale': config['scene_scale']}),
        'globloc.stride': str(config['stride']),
        'globloc.solver': 'horn',
        'globloc.inputs': json.dumps(list(INPUT_NAMES)),
        'globloc.outputs': json.dumps(list(OUTPUT_NAMES)),
        'globloc.dynamic_batch': json.dumps(bool(dynamic_batch)),
        'globloc.model_sha256': model_sha256,
        'globloc.torch_version': torch.__version__,
        'globloc.config': json.dumps(config),
    }


def graph_ops(model) -> Counter:
    """Op type counts of an onnx.ModelProto, subgraphs (If/Loop bodies) included; other domains as 'domain:Op'."""
    counts: Counter = Counter()

    def walk(graph):
        for node in graph.node:
            counts[f'{node.domain}:{node.op_type}' if node.domain not in ('', 'ai.onnx') else node.op_type] += 1
            for attr in node.attribute:
                for g in ([attr.g] if attr.HasField('g') else []) + list(attr.graphs):
                    walk(g)

    walk(model.graph)
    return counts


def check_ops(model, allowed: frozenset = TENSORRT_OPS) -> Counter:
    """Raise UnsupportedOpError naming every op outside `allowed` (and one node of each); else the op counts."""
    ops = graph_ops(model)
    bad = sorted(set(ops) - allowed)
    if bad:
        def first_node(op: str) -> str:
            name = op.split(':')[-1]
            return next((n.name or '(unnamed)' for n in model.graph.node if n.op_type == name), '(in a subgraph)')
        raise UnsupportedOpError('graph uses ops outside the TensorRT allow-list: '
                                 + ', '.join(f'{op} x{ops[op]} (e.g. node {first_node(op)})' for op in bad)
                                 + '; rewrite them with matmul/add/div/sqrt (see align.py) before exporting')
    return ops


def to_onnx(module: torch.nn.Module, args: tuple, input_names, output_names, dynamic_batch: bool = False):
    """torch.onnx.export (TorchScript exporter, opset 17) into memory -> onnx.ModelProto, checked by onnx.checker
    and the TensorRT op allow-list. Ops ONNX cannot express (SVD, eigh, inverse) raise UnsupportedOpError too."""
    import onnx
    buf = io.BytesIO()
    axes = {n: {0: 'batch'} for n in (*input_names, *output_names)} if dynamic_batch else None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter('ignore')  # tracer warnings about python ints: the input size is fixed
            torch.onnx.export(module, args, buf, input_names=list(input_names), output_names=list(output_names),
                              dynamic_axes=axes, opset_version=OPSET, dynamo=False, do_constant_folding=True)
    except torch.onnx.errors.UnsupportedOperatorError as e:
        raise UnsupportedOpError(f'graph uses an op that ONNX opset {OPSET} cannot express (so TensorRT '
                                 f'cannot run it either): {str(e).splitlines()[0]}') from e
    model = onnx.load_from_string(buf.getvalue())
    onnx.checker.check_model(model, full_check=True)
    check_ops(model)
    return model


def example_inputs(config: NetConfig) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(image (1, 3, H, W) grey, K (1, 3, 3) of it, depth (1, 1, H/stride, W/stride) zeros: none measured), the
    inputs a PoseGraph of `config` is traced with."""
    W, H = config.input_size
    s = config.stride
    image = torch.full((1, 3, H, W), 127.0)
    K = torch.tensor([[[0.9 * W, 0.0, (W - 1) / 2], [0.0, 0.9 * W, (H - 1) / 2], [0.0, 0.0, 1.0]]])
    return image, K, torch.zeros(1, 1, H // s, W // s)


def onnx_graph(model_path: str | os.PathLike, dynamic_batch: bool = False):
    """Model file -> (onnx.ModelProto of its PoseGraph with graph_metadata as metadata_props, the GlobLocNet,
    that metadata). Raises UnsupportedOpError for an op outside TENSORRT_OPS; nothing is written."""
    import onnx
    model_path = Path(model_path)
    net, _ = load_model(model_path)
    meta = graph_metadata(net.config.to_dict(), file_sha256(model_path), dynamic_batch)
    model = to_onnx(PoseGraph(net), example_inputs(net.config), INPUT_NAMES, OUTPUT_NAMES, dynamic_batch)
    onnx.helper.set_model_props(model, meta)
    model.doc_string = f'globloc PoseGraph of {model_path.name}'
    return model, net, meta

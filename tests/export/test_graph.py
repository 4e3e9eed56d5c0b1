"""export/graph.py: the CPU rewrites keep every output bit-identical and touch only what they can prove."""

import numpy as np
import pytest

from ..conftest import require_module

onnx = require_module("onnx")
ort = require_module("onnxruntime")

from onnx import TensorProto, helper, numpy_helper  # noqa: E402

from idc_export.graph import optimize_for_cpu  # noqa: E402
from idc_infer.model import default_model_path, load_model  # noqa: E402

from ..conftest import SAMPLE_PATIENT  # noqa: E402


def block_model(scale_sign: float = 1.0, extra_use: bool = False, seed: int = 0):
    """NHWC input -> conv -> relu -> per-channel Mul, Add (a post-ReLU batch norm, as tf2onnx writes it) ->
    2x2 MaxPool -> conv: a CancerNet block in miniature."""
    rng = np.random.default_rng(seed)
    c = 8
    inits = [
        numpy_helper.from_array(rng.normal(size=(c, 3, 3, 3)).astype(np.float32), "w1"),
        numpy_helper.from_array(rng.normal(size=c).astype(np.float32), "b1"),
        numpy_helper.from_array((scale_sign * rng.uniform(0.5, 3, (1, c, 1, 1))).astype(np.float32), "s"),
        numpy_helper.from_array(rng.normal(size=(1, c, 1, 1)).astype(np.float32), "t"),
        numpy_helper.from_array(rng.normal(size=(4, c, 3, 3)).astype(np.float32), "w2"),
    ]
    nodes = [
        helper.make_node("Transpose", ["x"], ["nchw"], perm=[0, 3, 1, 2]),
        helper.make_node("Conv", ["nchw", "w1", "b1"], ["c1"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c1"], ["r1"]),
        helper.make_node("Mul", ["r1", "s"], ["m1"]),
        helper.make_node("Add", ["m1", "t"], ["bn"]),
        helper.make_node("MaxPool", ["bn"], ["p1"], kernel_shape=[2, 2], strides=[2, 2]),
        helper.make_node("Conv", ["p1", "w2"], ["y"], pads=[1, 1, 1, 1]),
    ]
    outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 4, 12, 12])]
    if extra_use:  # the Mul's result is needed elsewhere too: it must stay
        nodes.append(helper.make_node("ReduceMax", ["m1"], ["side"], keepdims=0))
        outputs.append(helper.make_tensor_value_info("side", TensorProto.FLOAT, []))
    graph = helper.make_graph(
        nodes, "block", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 24, 24, 3])], outputs, inits
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def run(model, inputs: np.ndarray) -> list[np.ndarray]:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {"x": inputs})


def ops(model) -> list[str]:
    return [node.op_type for node in model.graph.node]


@pytest.fixture(scope="module")
def inputs() -> np.ndarray:
    return np.random.default_rng(1).uniform(0, 1, (32, 24, 24, 3)).astype(np.float32)


def test_batch_norm_becomes_a_conv_after_the_pooling_with_identical_outputs(inputs):
    model = block_model()
    before = run(model, inputs)
    assert optimize_for_cpu(model) == {"batchnorm_as_depthwise_conv": 1, "scale_after_maxpool": 1}
    assert ops(model) == ["Transpose", "Conv", "Relu", "MaxPool", "Conv", "Conv"]
    after = run(model, inputs)
    assert all(np.array_equal(a, b) for a, b in zip(before, after))


def test_a_negative_scale_is_not_moved_past_the_pooling(inputs):
    # max(s * x) is s * min(x) when s < 0: the pooling must keep seeing the scaled values
    model = block_model(scale_sign=-1.0)
    before = run(model, inputs)
    assert optimize_for_cpu(model) == {"batchnorm_as_depthwise_conv": 1, "scale_after_maxpool": 0}
    assert ops(model).index("MaxPool") > ops(model).index("Relu") + 1
    assert all(np.array_equal(a, b) for a, b in zip(before, run(model, inputs)))


def test_a_product_used_elsewhere_is_left_alone(inputs):
    model = block_model(extra_use=True)
    before = run(model, inputs)
    assert optimize_for_cpu(model) == {"batchnorm_as_depthwise_conv": 0, "scale_after_maxpool": 0}
    assert "Mul" in ops(model) and "Add" in ops(model)
    assert all(np.array_equal(a, b) for a, b in zip(before, run(model, inputs)))


def test_the_shipped_model_is_already_rewritten_and_says_so():
    proto = onnx.load(str(default_model_path()))
    assert ops(proto).count("Mul") == 1  # the dense layer's batch norm (2-D: no convolution to become)
    assert optimize_for_cpu(proto) == {"batchnorm_as_depthwise_conv": 0, "scale_after_maxpool": 0}
    export = load_model(default_model_path()).contract.provenance["export"]
    assert export["graph_rewrites"] == {"batchnorm_as_depthwise_conv": 6, "scale_after_maxpool": 3}


# the sample patient's probabilities as the shipped graph gave them before the rewrites (sha256 15ffcd3ba1bd,
# an AVX-512 Xeon); build_default_model.py --optimize-graph checked them bit-identical, CPUs may differ in ulps
BEFORE_REWRITES = [
    0.08776252606788912,
    0.7258015756447683,
    0.3812724385066937,
    0.016982241255358393,
    0.0007941239720322097,
    0.0005428094211537908,
    0.08751017651723453,
    0.8600277330634746,
    0.5794514850271391,
    0.8769218725209453,
    0.8656425898675862,
]


def test_the_shipped_model_still_scores_the_sample_patient_as_before_the_rewrites():
    from idc_export.convert import load_parity_inputs

    model = load_model(default_model_path(), threads=1)
    probs = model.predict_prob_idc(load_parity_inputs(model.contract, [SAMPLE_PATIENT], n_random=0))
    assert probs.tolist() == pytest.approx(BEFORE_REWRITES, rel=1e-6, abs=1e-9)


def test_unnamed_nodes_get_unique_constants(inputs):
    """tf2onnx names its nodes, other exporters need not: two unnamed batch norms must not clash."""
    model = block_model()
    graph = model.graph
    conv2 = next(node for node in graph.node if node.output[0] == "y")
    conv2.output[0] = "c2"
    extra = [
        helper.make_node("Relu", ["c2"], ["r2"]),
        helper.make_node("Mul", ["r2", "s2"], ["m2"]),
        helper.make_node("Add", ["m2", "t2"], ["y"]),
    ]
    graph.node.extend(extra)
    graph.initializer.extend(
        [
            numpy_helper.from_array(np.full((1, 4, 1, 1), 1.5, np.float32), "s2"),
            numpy_helper.from_array(np.full((1, 4, 1, 1), 0.25, np.float32), "t2"),
        ]
    )
    for node in graph.node:
        node.name = ""
    before = run(model, inputs)
    assert optimize_for_cpu(model)["batchnorm_as_depthwise_conv"] == 2
    assert len({init.name for init in model.graph.initializer}) == len(model.graph.initializer)
    assert all(np.array_equal(a, b) for a, b in zip(before, run(model, inputs)))


def test_graphs_with_subgraphs_or_an_old_ir_are_left_alone():
    """A branch of an If may read a tensor renamed here; before IR 4 initializers are graph inputs too."""
    old = block_model()
    old.ir_version = 3
    assert optimize_for_cpu(old) == {"batchnorm_as_depthwise_conv": 0, "scale_after_maxpool": 0}
    branching = block_model()
    then = helper.make_graph(
        [helper.make_node("Identity", ["m1"], ["branch_out"])],
        "then",
        [],
        [helper.make_tensor_value_info("branch_out", TensorProto.FLOAT, None)],
    )
    branching.graph.node.append(helper.make_node("If", ["cond"], ["picked"], then_branch=then, else_branch=then))
    assert optimize_for_cpu(branching) == {"batchnorm_as_depthwise_conv": 0, "scale_after_maxpool": 0}

"""--precision int8: the video encoder's linear layers dynamically quantised on the CPU, refused
elsewhere; what 'auto' chooses by the CPU's capabilities; an index's rows sharing one precision."""
import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import video_tool
from inference.api import VideoLanguageModel
from inference.index import update_index
from runtime.errors import UserError
from runtime.precision import INFERENCE_PRECISIONS, inference_precision, precision_for_index
from tests.inference_toy import make_toy_setup


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    return make_toy_setup(tmp_path_factory.mktemp("int8"), num_clips=6)


def load(toy, precision, family="retrieval"):
    return VideoLanguageModel.load(toy.configs[family], toy.checkpoints[family], device="cpu", precision=precision,
                                   overrides=toy.overrides)


def test_int8_embeddings_are_close_to_fp32(toy):
    fp32, int8 = load(toy, "fp32"), load(toy, "int8")
    def linears(module):
        return {m._get_name() for m in module.modules() if m._get_name() in ("Linear", "DynamicQuantizedLinear")}
    assert linears(int8.model.visual_encoder) == {"DynamicQuantizedLinear"}
    assert linears(int8.model.text_encoder) == {"Linear"}  # the text side stays fp32
    videos = sorted(toy.videos.glob("*.mp4"))
    reference, quantised = fp32.encode_videos(videos), int8.encode_videos(videos)
    assert quantised.paths == reference.paths
    cosine = F.cosine_similarity(reference.embeddings, quantised.embeddings, dim=-1)
    assert cosine.min() >= 0.99, cosine
    assert not torch.equal(reference.embeddings, quantised.embeddings)  # it did run int8
    # the fingerprint of the weights as loaded, before quantising: what an index compares
    assert int8.encoder_sha256 == fp32.encoder_sha256


def test_int8_is_refused_on_cuda_in_one_line():
    for device in ("cuda", "cuda:1"):  # the refusal needs no GPU: it comes before any is touched
        with pytest.raises(UserError, match=r"^--precision int8 runs on the CPU only .*not on cuda") as refused:
            inference_precision("int8", device)
        assert "\n" not in str(refused.value)
    assert inference_precision("int8", "cpu").int8


def test_int8_precision_names():
    precision = inference_precision("int8", "cpu")
    assert precision.dtype is None and precision.label == "int8" and precision.name == "int8"
    assert "int8" in precision.describe()
    assert video_tool.PRECISIONS == INFERENCE_PRECISIONS
    assert inference_precision("bf16", "cpu").label == "bfloat16"  # what earlier manifests record
    assert inference_precision("fp32", "cpu").label == "fp32"


@pytest.mark.parametrize("native_bf16, int8_fast, chosen, says", [
    # an AVX2-only CPU: int8 is faster but changes token merging too much to be chosen; the line says so
    (False, True, "fp32", "no native bf16; --precision int8 encodes 1.8x faster but keeps only 2/3"),
    (True, True, "bf16", "runs bf16 natively"),  # AVX-512 with bf16 (AMD Zen 4), AMX (Sapphire Rapids)
    (True, False, "bf16", "runs bf16 natively"),
    (False, False, "fp32", "no native bf16"),  # no int8 kernels either (not x86, say): nothing to suggest
])
def test_auto_choice_by_cpu_capability(native_bf16, int8_fast, chosen, says):
    precision = inference_precision("auto", "cpu", cpu_bf16_is_native=lambda: native_bf16,
                                    cpu_int8_is_fast=lambda: int8_fast)
    assert precision.name == chosen and precision.method == "auto" and not precision.int8
    assert precision.reason.startswith("this CPU") and says in precision.reason and "\n" not in precision.reason
    assert ("int8" in precision.reason) == (int8_fast and not native_bf16)


def test_auto_says_what_it_picked_on_stderr(toy, capsys):
    model = load(toy, "auto")
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("precision:")]
    assert lines == [f"precision: auto -> {model.precision.name} ({model.precision.reason})"]
    load(toy, "fp32")
    assert "precision:" not in capsys.readouterr().err  # an explicit precision is not announced


def test_precision_for_index_follows_the_index():
    follows = precision_for_index("auto", "int8", "cpu", "IDX", updating=True)
    assert follows == ("int8", "index IDX was encoded at int8: the rows of an index share one precision")
    assert precision_for_index("fp32", "int8", "cpu", "IDX", updating=True) == ("fp32", None)  # explicit: kept
    assert precision_for_index("auto", None, "cpu", "IDX", updating=True) == ("auto", None)  # not recorded
    assert precision_for_index("auto", "bfloat16", "cpu", "IDX", updating=True,
                               cpu_bf16_is_native=lambda: True)[0] == "bf16"
    # an update the device cannot run as the index was encoded: one line saying what to do
    with pytest.raises(UserError, match=r"encoded at int8, which runs on a CPU only: update it with --device cpu"):
        precision_for_index("auto", "int8", "cuda", "IDX", updating=True)
    with pytest.raises(UserError, match=r"encoded at bfloat16, which this CPU only emulates"):
        precision_for_index("auto", "bfloat16", "cpu", "IDX", updating=True, cpu_bf16_is_native=lambda: False)
    # a search reads the index: it falls back to the device's own choice
    assert precision_for_index("auto", "int8", "cuda", "IDX", updating=False) == ("auto", None)


def test_an_index_keeps_one_precision(toy, tmp_path, capsys):
    """Rows encoded at int8 and at fp32 do not mix: an update at the other precision is refused,
    'auto' follows the index's, and the manifest records it."""
    videos = tmp_path / "videos"
    videos.mkdir()
    first, second = sorted(toy.videos.glob("*.mp4"))[:2]
    (videos / first.name).write_bytes(first.read_bytes())
    index = tmp_path / "index"
    update_index(load(toy, "int8"), videos, index, num_workers=0)
    assert json.loads((index / "manifest.json").read_text())["precision"] == "int8"
    with pytest.raises(UserError, match=r"encoded at int8, this run encodes at fp32: the rows of an index share one "
                                        r"precision; pass --precision int8 \(or auto\)"):
        update_index(load(toy, "fp32"), videos, index, num_workers=0)

    (videos / second.name).write_bytes(second.read_bytes())
    argv = ["index", str(videos), "--index", str(index), "--num_workers", "0", "--options", *toy.overrides]
    video_tool.main(argv)  # the model and 'auto' from the index: int8, said on stderr
    captured = capsys.readouterr()
    assert f"precision: auto -> int8 (index {index} was encoded at int8" in captured.err
    assert "(1 encoded, 1 unchanged" in captured.out
    assert json.loads((index / "manifest.json").read_text())["precision"] == "int8"
    with pytest.raises(SystemExit):
        video_tool.main([*argv, "--precision", "fp32"])
    assert "pass --precision int8" in capsys.readouterr().err


def test_quantised_linear_matches_fp32_closely():
    """The layer itself: int8 weights and activations, a float32 result within int8 rounding."""
    from runtime.precision import quantize_linear_layers
    torch.manual_seed(0)
    layer = nn.Sequential(nn.Linear(64, 128))
    x = torch.randn(50, 64)
    expected = layer(x)
    quantised = quantize_linear_layers(layer)
    got = quantised(x)
    assert got.dtype == torch.float32
    assert F.cosine_similarity(got.flatten(), expected.flatten(), dim=0) > 0.999

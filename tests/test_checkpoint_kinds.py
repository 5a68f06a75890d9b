"""The three released DiT kinds and the causal VAE convert from synthetic files laid out as the releases are
(`released_keys/nvlabs.json` names; tiny shapes where a file is converted, the 2.6B shapes where only names and
shapes are checked), each into a checkpoint of its own mode; loading weights into a model of another kind, and
converting a checkpoint as a kind its files contradict, fail with one line."""

from __future__ import annotations

import copy
import json

import chex
import pytest
import torch
from safetensors.torch import save_file

import convert_torch_weights
from sanawm_jax import cli, load_transformer
from sanawm_jax.checkpoint.torch_sources import TensorSource, TorchStateDictSource, open_torch_checkpoint
from sanawm_jax.models.sana_wm.checkpoint import (
    checkpoint_mode,
    convert_state_dict,
    convert_transformer,
    detect_dit_kind,
    released_table,
    released_tensor_shapes,
)
from sanawm_jax.models.sana_wm.config import PRESETS
from sanawm_jax.pipeline import load_vae
from tests.conftest import TINY_VAE_DIFFUSERS_CONFIG
from tests.test_released_keys import nvlabs_state_dict

# configs/sana_wm/stage1/sana_wm_stage1_sekai_chunk_causal_cp2_fsdp2.yaml's model section (UPSTREAM_NOTES 1.3); the
# released SANA-WM_chunk_causal/config.yaml describes the same model.
CHUNK_CAUSAL_YAML = {
    "model": "SanaMSVideoCamCtrl_1600M_P1_D20", "attn_type": "ChunkCausalGDNTriton",
    "camctrl_type": "ChunkCausalGDNUCPESinglePathLiteLABothTriton", "ffn_type": "ChunkGLUMBConvTemp",
    "chunk_size": 3, "chunk_split_strategy": "first_chunk_plus_one",
}
CHUNK_CAUSAL_FILE = "sana_wm_chunk_causal_1600m_720p.safetensors"
DENOISING_STEPS = [1000, 960, 889, 727, 0]


@pytest.fixture(scope="module")
def oracle(tiny_oracle):
    return copy.deepcopy(tiny_oracle[0]).float()


@pytest.fixture(scope="module")
def nvlabs_state(oracle):
    """The tiny oracle's tensors under the released NVlabs names (pos_embed and null caption embedding included)."""
    return nvlabs_state_dict(oracle, released_tensor_shapes(PRESETS["sana_wm_tiny"])["nvlabs"])


@pytest.fixture(scope="module")
def released(nvlabs_state, oracle):
    """What the source writers below take: the NVlabs-named state dict and the diffusers model."""
    return nvlabs_state, oracle


@pytest.fixture(scope="module")
def expected_params(nvlabs_state):
    return convert_state_dict(TorchStateDictSource(nvlabs_state, "released names"), PRESETS["sana_wm_tiny"],
                              log=lambda *_: None)


def save_distillation_pickle(path, generator: dict, critic: dict | None):
    """sana_dit/model.pt as the distillation trainer saves it: FSDP full state dicts of the wrapped models."""
    payload = {"generator": generator, "step": 3000, "denoising_step_list": DENOISING_STEPS}
    if critic is not None:
        payload["critic"] = critic
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(payload, path)


def chunk_causal_release(released, root):
    """SANA-WM_chunk_causal: dit/<file>.safetensors and config.yaml; converted from the repository folder."""
    state, _ = released
    (root / "dit").mkdir(parents=True)
    save_file(state, str(root / "dit" / CHUNK_CAUSAL_FILE))
    (root / "config.yaml").write_text(json.dumps({"model": CHUNK_CAUSAL_YAML}))  # JSON is YAML
    return root


def chunk_causal_file_alone(released, root):
    state, _ = released
    root.mkdir(parents=True)
    save_file(state, str(root / CHUNK_CAUSAL_FILE))
    return root / CHUNK_CAUSAL_FILE


def streaming_release(released, root):
    """SANA-WM_streaming: sana_dit/model.pt (generator and critic, keys prefixed "model.") and ltx2_causal_vae/."""
    state, _ = released
    prefixed = {f"model.{name}": tensor for name, tensor in state.items()}
    save_distillation_pickle(root / "sana_dit" / "model.pt", prefixed, prefixed)
    write_causal_vae_folder(root / "ltx2_causal_vae")
    return root


def streaming_pickle_with_wrapper_names(released, root):
    """A generator saved through FSDP and torch.compile wrappers without their names cleaned."""
    state, _ = released
    wrapped = {f"_orig_mod.model._fsdp_wrapped_module.{name}": tensor for name, tensor in state.items()}
    save_distillation_pickle(root / "model.pt", wrapped, None)
    return root / "model.pt"


def write_causal_vae_folder(folder):
    """ltx2_causal_vae/ as NVlabs' AutoencoderKLCausalLTX2Video.save_pretrained writes it (tiny, zero weights)."""
    from diffusers import AutoencoderKLLTX2Video

    vae = AutoencoderKLLTX2Video(**{**TINY_VAE_DIFFUSERS_CONFIG, "decoder_causal": True})
    vae.save_pretrained(folder)
    fields = json.loads((folder / "config.json").read_text())
    fields.update(_class_name="AutoencoderKLCausalLTX2Video", decoder_upsample_type=None)
    del fields["upsample_type"]
    (folder / "config.json").write_text(json.dumps(fields))


def convert(argv, capsys):
    """Run convert_torch_weights as its command line does -> (exit code or None, stderr lines)."""
    try:
        cli.run(convert_torch_weights.main, [str(arg) for arg in argv])
    except SystemExit as exited:
        return exited.code, capsys.readouterr().err.splitlines()
    return None, capsys.readouterr().err.splitlines()


def diffusers_folder(**fields):
    """A diffusers transformer folder whose config.json has `fields` added."""
    def make(released, root):
        _, oracle = released
        oracle.save_pretrained(root)
        config = json.loads((root / "config.json").read_text())
        (root / "config.json").write_text(json.dumps({**config, **fields}))
        return root
    return make


def unlabelled_file(released, root):
    state, _ = released
    root.mkdir(parents=True)
    save_file(state, str(root / "dit.safetensors"))
    return root / "dit.safetensors"


# name: (how the source is written, extra converter arguments, the mode it converts to)
SOURCES = {
    "chunk-causal-release": (chunk_causal_release, [], "chunk_causal"),
    "chunk-causal-file-name": (chunk_causal_file_alone, [], "chunk_causal"),
    "streaming-release": (streaming_release, [], "streaming"),
    "streaming-wrapper-names": (streaming_pickle_with_wrapper_names, [], "streaming"),
    "unlabelled": (unlabelled_file, [], "bidirectional"),
    "unlabelled-with-mode": (unlabelled_file, ["--mode", "chunk_causal"], "chunk_causal"),
    "diffusers-chunk-causal": (diffusers_folder(ffn_type="ChunkGLUMBConvTemp", chunk_size=3), [], "chunk_causal"),
}


@pytest.fixture(scope="module")
def converted(released, tmp_path_factory):
    """{name: checkpoint directory} of every source in SOURCES, converted with the tiny preset (a diffusers folder
    with its own config.json)."""
    root = tmp_path_factory.mktemp("kinds")
    for name, (make_input, extra, _) in SOURCES.items():
        src = make_input(released, root / name / "release")
        config = [] if (src / "config.json").is_file() else ["--config", "sana_wm_tiny"]
        convert_torch_weights.main([str(src), str(root / name / "ckpt"), *config, *extra])
    return {name: root / name / "ckpt" for name in SOURCES}


@pytest.mark.parametrize("name", SOURCES)
def test_each_kind_converts_into_a_checkpoint_of_its_mode(converted, expected_params, name):
    mode = SOURCES[name][2]
    assert checkpoint_mode(converted[name]) == mode
    model, params = load_transformer(converted[name])
    assert model.config.mode == mode and model.config.chunk_frames == 3
    chex.assert_trees_all_equal(params, expected_params)


def test_streaming_release_brings_its_causal_vae(converted):
    config, _ = load_vae(converted["streaming-release"])
    assert config.decoder_causal
    with pytest.raises(ValueError, match=r"holds a VAE with decoder_causal=True; it cannot be loaded with "
                                         r"decoder_causal=False"):
        load_vae(converted["streaming-release"], decoder_causal=False)


@pytest.mark.parametrize(
    "make_input, mode, message",
    [
        (chunk_causal_release, "bidirectional",
         f"{CHUNK_CAUSAL_FILE} is a SANA-WM chunk_causal DiT checkpoint (by its config.yaml); it cannot be converted "
         "as mode=bidirectional"),
        (chunk_causal_file_alone, "streaming", "chunk_causal DiT checkpoint (by file name); it cannot be converted"),
        (streaming_release, "chunk_causal",
         "model.pt is a SANA-WM streaming DiT checkpoint (by its 'generator' state dict, the distillation trainer's "
         "save); it cannot be converted as mode=chunk_causal"),
        (diffusers_folder(), "chunk_causal",
         "is a SANA-WM bidirectional DiT checkpoint (by config.json); it cannot be converted as mode=chunk_causal"),
    ],
    ids=["chunk-causal-as-bidirectional", "chunk-causal-as-streaming", "streaming-as-chunk-causal",
         "diffusers-bidirectional-as-chunk-causal"],
)
def test_conversion_as_another_kind_is_one_line_and_no_output(released, tmp_path, capsys, make_input, mode,
                                                              message):
    src = make_input(released, tmp_path / "release")
    code, lines = convert([src, tmp_path / "out", "--config", "sana_wm_tiny", "--mode", mode], capsys)
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], lines
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("name, requested", [("unlabelled", "streaming"), ("chunk-causal-release", "bidirectional"),
                                             ("streaming-release", "chunk_causal")])
def test_loading_into_a_model_of_another_kind_is_refused(converted, name, requested):
    saved = SOURCES[name][2]
    with pytest.raises(ValueError) as error:
        load_transformer(converted[name], mode=requested)
    message = str(error.value)
    assert "\n" not in message
    assert f"holds a {saved} DiT (converted from a {saved} checkpoint); it cannot be loaded with mode={requested}" \
        in message


def test_loading_with_its_own_mode_works(converted):
    model, _ = load_transformer(converted["chunk-causal-release"], mode="chunk_causal")
    assert model.config.mode == "chunk_causal"


@pytest.mark.parametrize(
    "payload, message",
    [
        ({"critic": {"model.x_embedder.proj.weight": torch.zeros(2)}, "step": 1},
         "holds a distillation 'critic' (the fake-score model) but no 'generator'"),
        ({"step": 1, "optimizer": {"lr": 1e-5}}, "no tensors found in the torch checkpoint (top level; its entries: "
                                                 "['optimizer', 'step']); expected one of"),
    ],
    ids=["critic-only", "unknown"],
)
def test_pickle_without_a_generator_is_refused(tmp_path, capsys, payload, message):
    torch.save(payload, tmp_path / "model.pt")
    code, lines = convert([tmp_path / "model.pt", tmp_path / "out", "--config", "sana_wm_tiny"], capsys)
    assert code == 2 and len(lines) == 1 and message in lines[0], lines
    assert not (tmp_path / "out").exists()


class HeaderOnly(TensorSource):
    """A source whose names and shapes are those of `inner`, and which stops the conversion at the first read."""

    class Read(Exception):
        pass

    def __init__(self, inner):
        super().__init__(inner.description, inner.config, inner.path, inner.top_level)
        self.inner = inner

    def keys(self):
        return self.inner.keys()

    def shape(self, key):
        return self.inner.shape(key)

    def dtype_name(self, key):
        return self.inner.dtype_name(key)

    def load(self, key):
        raise self.Read(key)


def test_released_streaming_model_pt_layout_matches_the_2_6b_model(tmp_path):
    """The generator of a model.pt with every released name and 2.6B shape (zero-stride tensors: a 100 kB file)
    is detected as streaming and passes every name and shape check of the 2.6B model (any mismatch would raise a
    ConversionError before the first read); the critic beside it is not read."""
    base = torch.zeros(1)
    generator = {f"model.{name}": base.expand(shape) for name, shape in released_table("nvlabs").items()}
    save_distillation_pickle(tmp_path / "sana_dit" / "model.pt", generator, critic=dict(generator))
    source = open_torch_checkpoint(tmp_path / "sana_dit" / "model.pt")
    assert detect_dit_kind(source).mode == "streaming"
    with pytest.raises(HeaderOnly.Read):  # every name and shape passed; the first tensor is about to be read
        convert_transformer(HeaderOnly(source), PRESETS["sana_wm_2.6b"], log=lambda *_: None)

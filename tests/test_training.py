"""Stage-1 training: the flow-matching objective, loss decrease on a fixed batch, exact resume after a restart,
and the `train.py` CLI on its embedded default data."""

from __future__ import annotations

import shutil

import chex
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

import train
from sanawm_jax.data import (
    ClipDirectorySource,
    DataConfig,
    TextEmbeddingStore,
    make_dataset,
)
from sanawm_jax.models.sana_wm.config import PRESETS
from sanawm_jax.models.sana_wm.transformer import abstract_params
from sanawm_jax.training import TrainConfig, Trainer, objective, restore_transformer

NUM_FRAMES, HEIGHT, WIDTH = 17, 64, 96
MODEL_CONFIG = PRESETS["sana_wm_tiny"]
# A learning rate high enough for a tiny model to fit a batch within a few dozen steps; recipe otherwise.
TRAIN_CONFIG = TrainConfig(
    learning_rate=1e-3, text_dropout=0.0, num_frames=NUM_FRAMES, target_size=(HEIGHT, WIDTH), num_steps=6,
    checkpoint_every=3, seed=7,
)


@pytest.fixture(scope="module")
def default_data(demo_train_data):
    """The embedded default of train.py (synthetic clips, tiny demo VAE latents and text embeddings)."""
    return demo_train_data


def dataset(data_root, config: TrainConfig = TRAIN_CONFIG, source=None):
    data_config = DataConfig(
        num_frames=config.num_frames, target_size=config.target_size, batch_size=config.batch_size,
        caption_dropout=config.text_dropout, seed=config.seed, num_threads=1, prefetch_buffer_size=1,
    )
    source = source or ClipDirectorySource(data_root / "clips", inputs="latents")
    return make_dataset(source, data_config, TextEmbeddingStore(data_root / "text"))


def training_inputs(key, latents, clean_first_frame_prob):
    """`objective.training_inputs` with the recipe's shift, compiled (eager dispatch is slow on a loaded CPU)."""
    return _compiled_training_inputs(key, latents, jnp.float32(clean_first_frame_prob))


_compiled_training_inputs = jax.jit(
    lambda key, latents, probability: objective.training_inputs(
        key, latents, shift=9.95, clean_first_frame_prob=probability
    )
)


def host_copy(tree):
    return jax.tree.map(lambda a: np.array(a), tree)


# ---- objective -------------------------------------------------------------------------------------------------


def test_sigmas_are_shifted_logit_normal():
    shift = 9.95
    sigmas = np.asarray(objective.sample_sigmas(jax.random.key(0), (20000,), shift))
    assert sigmas.min() > 0 and sigmas.max() < 1
    # sigmoid(N(0, 1)) has median 1/2, and the shift is monotone, so the median is s/2 / (1 + (s-1)/2) = s/(s+1).
    # 20k samples: the sample median's standard error is ~0.002 here; 0.01 is five of them.
    assert abs(np.median(sigmas) - shift / (shift + 1)) < 0.01


def test_training_inputs_shapes_and_per_frame_timesteps():
    latents = jax.random.normal(jax.random.key(1), (3, 4, 2, 3, 8))
    inputs = training_inputs(jax.random.key(2), latents, 0.0)
    assert inputs["noisy_latents"].shape == latents.shape and inputs["target"].shape == latents.shape
    assert inputs["timesteps"].shape == inputs["frame_weights"].shape == (3, 4)
    timesteps = np.asarray(inputs["timesteps"])
    assert (timesteps > 0).all() and (timesteps < 1000).all()
    assert len(np.unique(timesteps)) == timesteps.size  # one independent draw per frame
    np.testing.assert_array_equal(inputs["frame_weights"], np.ones((3, 4)))


def test_noisy_input_and_velocity_target_follow_the_flow_definition():
    latents = jax.random.normal(jax.random.key(3), (3, 4, 2, 3, 8))
    inputs = training_inputs(jax.random.key(4), latents, 0.5)
    sigma = np.asarray(inputs["timesteps"])[:, :, None, None, None] / 1000
    noisy, target = np.asarray(inputs["noisy_latents"]), np.asarray(inputs["target"])
    # x_σ = (1-σ)x0 + σε and v = ε - x0 give x0 = x_σ - σ·v; float32 round-off on O(1) values: 1e-5.
    np.testing.assert_allclose(noisy - sigma * target, np.asarray(latents), atol=1e-5)


def test_clean_first_frame_has_timestep_zero_and_no_loss_weight():
    latents = jax.random.normal(jax.random.key(5), (3, 4, 2, 3, 8))
    inputs = training_inputs(jax.random.key(6), latents, 1.0)
    np.testing.assert_array_equal(inputs["timesteps"][:, 0], 0.0)
    np.testing.assert_array_equal(inputs["noisy_latents"][:, 0], latents[:, 0])
    np.testing.assert_array_equal(inputs["frame_weights"], np.tile([0.0, 1.0, 1.0, 1.0], (3, 1)))


def test_clean_first_frame_probability_is_per_sample():
    clean = np.asarray(objective.sample_clean_first_frame(jax.random.key(7), 20000, 0.9))
    # Binomial(20000, 0.9): standard deviation of the fraction 0.002; 0.01 is five of them.
    assert abs(clean.mean() - 0.9) < 0.01


def test_frame_valid_mask_removes_frames_from_the_loss():
    weights = objective.loss_frame_weights(jnp.array([True, False]), 3, jnp.array([[1, 1, 0], [1, 0, 1]]))
    np.testing.assert_array_equal(weights, [[0, 1, 0], [1, 0, 1]])


def test_masked_mse_averages_only_weighted_frames():
    rng = np.random.default_rng(0)
    prediction, target = rng.standard_normal((2, 2, 2, 3, 2, 4))
    prediction[:, 0] += 100.0  # excluded frames may hold anything
    weights = np.array([[0.0, 1.0], [0.0, 1.0]])
    expected = np.mean((prediction[:, 1] - target[:, 1]) ** 2)
    # float32 accumulation of ~100 O(1) squares: 1e-5 relative.
    np.testing.assert_allclose(objective.masked_mse(prediction, target, weights), expected, rtol=1e-5)


def test_train_config_defaults_are_the_upstream_recipe():
    config = TrainConfig()
    assert (config.learning_rate, config.betas, config.eps, config.weight_decay) == (1e-5, (0.9, 0.999), 1e-10, 0.0)
    assert (config.grad_clip_norm, config.flow_shift, config.logit_mean, config.logit_std) == (0.5, 9.95, 0.0, 1.0)
    assert (config.clean_first_frame_prob, config.text_dropout) == (0.9, 0.1)


def test_train_config_rejects_bad_values():
    with pytest.raises(ValueError, match="num_frames"):
        TrainConfig(num_frames=16)
    with pytest.raises(ValueError, match="clean_first_frame_prob"):
        TrainConfig(clean_first_frame_prob=1.5)


# ---- loop ------------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_loss_decreases_when_overfitting_one_batch(default_data, tmp_path):
    one_clip = ClipDirectorySource(default_data / "clips", inputs="latents")
    one_clip.clips = one_clip.clips[:1]
    config = TRAIN_CONFIG.replace(checkpoint_every=100)  # one checkpoint, at the end
    trainer = Trainer(MODEL_CONFIG, config, tmp_path, dataset(default_data, config, source=one_clip))
    records = trainer.run(30)
    trainer.close()
    assert {clip for record in records for clip in record["clips"]} == {one_clip.clips[0].key}
    losses = np.array([record["loss"] for record in records])
    assert np.isfinite(losses).all()
    # σ and the noise are redrawn every step, so single losses are noisy; compare 5-step means. Measured ratio of
    # last-five to first-five mean: 0.20 (2.06 -> 0.42); require a 2x drop.
    assert losses[-5:].mean() < 0.5 * losses[:5].mean(), losses


def test_resume_after_restart_reproduces_an_uninterrupted_run(default_data, tmp_path):
    straight = Trainer(MODEL_CONFIG, TRAIN_CONFIG, tmp_path / "straight", dataset(default_data))
    straight_records = straight.run(6)
    straight_params = host_copy(straight.params)
    straight.close()

    first = Trainer(MODEL_CONFIG, TRAIN_CONFIG, tmp_path / "restarted", dataset(default_data))
    first_records = first.run(3)
    first.close()
    del first  # nothing survives but the workdir

    resumed = Trainer(MODEL_CONFIG, TRAIN_CONFIG, tmp_path / "restarted", dataset(default_data))
    assert resumed.step == 3
    resumed_records = resumed.run(6)
    resumed_params = host_copy(resumed.params)
    resumed.close()

    consumed = [record["clips"] for record in first_records + resumed_records]
    assert consumed == [record["clips"] for record in straight_records]
    np.testing.assert_allclose(
        [r["loss"] for r in first_records + resumed_records], [r["loss"] for r in straight_records], rtol=1e-6
    )
    # Same programs on the same inputs: identical up to 1e-6 (in practice bit-exact).
    chex.assert_trees_all_close(resumed_params, straight_params, rtol=1e-6, atol=1e-6)


def test_a_save_killed_before_its_commit_resumes_from_the_previous_checkpoint(default_data, tmp_path, monkeypatch):
    config = TRAIN_CONFIG.replace(checkpoint_every=2)
    killed = Trainer(MODEL_CONFIG, config, tmp_path, dataset(default_data, config))
    killed.run(2)
    lost = [killed.train_step(), killed.train_step()]

    # Orbax writes a checkpoint into a temporary directory and commits it with a rename; failing at the commit
    # leaves on disk what a kill during the save leaves.
    async def killed_at_commit(self):
        raise RuntimeError("killed during the save")

    monkeypatch.setattr(ocp.path.atomicity.AtomicRenameTemporaryPath, "finalize", killed_at_commit)
    with pytest.raises(RuntimeError, match="killed during the save"):
        killed.save()
    monkeypatch.undo()
    killed.close()
    assert not (tmp_path / "checkpoints" / "4").exists()

    resumed = Trainer(MODEL_CONFIG, config, tmp_path, dataset(default_data, config))
    assert resumed.step == 2
    redone = resumed.run(4)
    resumed.close()
    assert [r["clips"] for r in redone] == [r["clips"] for r in lost]
    # Same programs on the same inputs: identical up to 1e-6 (in practice bit-exact).
    np.testing.assert_allclose([r["loss"] for r in redone], [r["loss"] for r in lost], rtol=1e-6)
    # The uncommitted temporary directory is gone; step 4 is the new run's.
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["2", "4"]


def test_resume_rejects_another_model_config(default_data, tmp_path):
    trainer = Trainer(MODEL_CONFIG, TRAIN_CONFIG, tmp_path, dataset(default_data))
    trainer.run(1)
    trainer.close()
    with pytest.raises(ValueError, match="another model config"):
        Trainer(MODEL_CONFIG.replace(num_layers=2), TRAIN_CONFIG, tmp_path, dataset(default_data))


def test_cli_trains_on_the_embedded_default_and_writes_a_readable_checkpoint(default_data, tmp_path):
    shutil.copytree(default_data, tmp_path / "data")  # the CLI's own default, already built by the fixture
    records = train.main([
        "--workdir", str(tmp_path), "--steps", "3", "--checkpoint-every", "2",
        "--lr", str(TRAIN_CONFIG.learning_rate), "--text-dropout", "0.1", "--seed", "1", "--no-compilation-cache",
    ])
    assert [record["step"] for record in records] == [1, 2, 3]
    assert all(np.isfinite(record["loss"]) for record in records)
    assert sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir()) == [2, 3]
    model, params = restore_transformer(tmp_path)
    abstract = abstract_params(model.config)
    chex.assert_trees_all_equal_shapes_and_dtypes(params, abstract)
    chex.assert_tree_all_finite(params)

"""What the release before the cascade became a list wrote still loads (tests/data/previous_release/): its
bundle, whose config is in the older keys, samples the same try-ons it sampled then."""
import pytest
import torch
from safetensors.torch import load_file

from conftest import ROOT, make_synthetic_shards

PREVIOUS = ROOT / "tests" / "data" / "previous_release"


def test_a_bundle_of_the_previous_release_loads_and_samples_what_it_sampled_then(tmp_path):
    from tryon_ds.inference import TryOnPipeline

    shards = make_synthetic_shards(tmp_path / "shards", samples=40, shard_size=100, image_size=128)
    pipe = TryOnPipeline.from_pretrained(PREVIOUS / "bundle", ema=False)
    assert list(pipe.unets) == [1, 2, 3] and pipe.output_size == (128, 128)
    assert [pipe.configs[3].unet(n).preset for n in (1, 2, 3)] == ["tiny", "tiny-sr", "tiny-sr3"]
    batch = next(pipe.shard_batches(str(shards / "val-*.tar"), batch_size=2, limit=2))
    out = pipe.generate(batch, sampler="ddim", steps=(2,), seed=0, keys=batch[1]["key"])
    then = load_file(PREVIOUS / "outputs.safetensors")
    for number, images in out.items():
        torch.testing.assert_close(images.half(), then[f"unet{number}"], rtol=0, atol=2e-3, msg=f"unet{number}")


def test_a_checkpoint_config_of_the_previous_release_builds_the_same_model():
    """trainer_state.json holds the run's config as the bundle does; consolidation and resuming build it."""
    import json

    from tryon_ds.bundle import check_weights
    from tryon_ds.config import build_config

    meta = json.loads((PREVIOUS / "bundle" / "unet2" / "config.json").read_text())
    assert "unet2" in meta["config"] and "unets" not in meta["config"]  # written in the older keys
    config = build_config(meta["config"])
    check_weights(load_file(PREVIOUS / "bundle" / "unet2" / "weights.safetensors"), config, 2, "unet2")
    with pytest.raises(Exception, match="does not match"):
        check_weights(load_file(PREVIOUS / "bundle" / "unet1" / "weights.safetensors"), config, 2, "unet1 as unet2")

"""`examples/shapes/sampler_ceiling.py`: sampling with the exact token distribution of a caption (a perfect model)."""

import importlib.util

import torch
from conftest import ROOT

from enat_diffusers import MaskedTokenScheduler


spec = importlib.util.spec_from_file_location("sampler_ceiling", ROOT / "examples" / "shapes" / "sampler_ceiling.py")
sampler_ceiling = importlib.util.module_from_spec(spec)
spec.loader.exec_module(sampler_ceiling)

MASK = 4
CANDIDATES = torch.tensor([[0, 1, 2, 3], [0, 1, 3, 2], [1, 1, 0, 0]])


def probabilities(ids):
    return sampler_ceiling.oracle_logits(CANDIDATES, torch.tensor(ids), MASK)[0].exp()


def test_the_marginals_come_from_the_candidates_that_agree_with_the_visible_tokens():
    everything_masked = probabilities([MASK] * 4)
    assert torch.allclose(everything_masked[0, :MASK], torch.tensor([2 / 3, 1 / 3, 0, 0]), atol=1e-5)
    first_visible = probabilities([0, MASK, MASK, MASK])  # the third candidate disagrees: it no longer counts
    assert torch.allclose(first_visible[2, :MASK], torch.tensor([0, 0, 0.5, 0.5]), atol=1e-5)
    third_visible = probabilities([0, MASK, 3, MASK])  # only the second candidate agrees
    assert torch.allclose(third_visible[3, :MASK], torch.tensor([0, 0, 1.0, 0]), atol=1e-5)
    none_agrees = probabilities([1, MASK, 3, MASK])  # none agrees with both: the two that agree with one count
    assert torch.allclose(none_agrees[3, :MASK], torch.tensor([0.5, 0, 0.5, 0]), atol=1e-5)


def test_sampling_with_one_candidate_returns_it_and_the_schedule_reveals_everything():
    grid = torch.arange(64) % 8
    scheduler = MaskedTokenScheduler(mask_token_id=8, mask_temperature=4.5, sampling_temperature=0.5)
    for steps in (1, 4, 8):
        assert torch.equal(sampler_ceiling.sample(grid[None], scheduler, steps, torch.Generator()), grid)


def test_candidates_cover_the_jitters_of_a_caption():
    one = sampler_ceiling.candidate_scenes("a small red circle on the left", max_candidates=400, seed=0)
    assert len(one) == 49 and len({image.tobytes() for image in one}) == 49
    two = sampler_ceiling.candidate_scenes(
        "a small red circle on the left and a large blue square on the right", max_candidates=100, seed=0
    )
    assert len(two) == 100 and len({image.tobytes() for image in two}) == 100

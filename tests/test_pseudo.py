"""Test pseudo-labels: which labels a test clip gets, the labelled test clips, and how the budget prices the round."""
import time

import numpy as np
import pytest

from fattag.budget import Budget
from fattag.config import make_config
from fattag.cost import Throughput, Workload, plan_run, stage_costs
from fattag.data import ClipTable
from fattag.features import MelStore
from fattag.pseudo import labelled_test, pseudo_labels
from fattag.stages import ROUND_STAGE

WORKLOAD = Workload(noisy_train=950, noisy_holdout_windows=150, curated=500, curated_windows=1500,
                    test_windows=1000, test_clips=300, noisy_clips=1000)
CPU = Throughput(1 / 150, 1 / 600, "cpu-ish")
NO_ROUND = make_config("cpu", sets=["pseudo_epochs=0"])


def budget(cfg, deadline):
    """A run's Budget once the workload and the throughput are known."""
    b = Budget(cfg, deadline)
    b.start(WORKLOAD, CPU)
    return b


def biased_scores() -> np.ndarray:
    """60 clips, 3 classes. Class 0 scores 0.6 everywhere (a bias); class 1 is the evidence in clips 0-29, class 2
    in clips 30-59, both below class 0 in absolute terms."""
    p = np.zeros((60, 3))
    p[:, 0] = 0.6
    p[:30, 1], p[30:, 1] = 0.4, 0.05
    p[:30, 2], p[30:, 2] = 0.08, 0.12
    return p


def test_each_clip_gets_its_top_class_and_the_classes_over_the_threshold():
    p = biased_scores()
    plain = pseudo_labels(p, threshold=0.5, balance=False)
    assert plain.dtype == np.float32 and (plain == [1, 0, 0]).all()      # top class 0, nothing else >= 0.5
    balanced = pseudo_labels(p, threshold=0.5, balance=True)              # top by p / mean(p): the evidence
    assert (balanced[:30] == [1, 1, 0]).all() and (balanced[30:] == [1, 0, 1]).all()
    strict = pseudo_labels(p, threshold=0.9, balance=True)                # nothing over it: the top class only
    assert (strict.sum(1) == 1).all() and (strict[:30, 1] == 1).all() and (strict[30:, 2] == 1).all()
    loose = pseudo_labels(p, threshold=0.1, balance=False)
    assert (loose[:30] == [1, 1, 0]).all() and (loose[30:] == [1, 0, 1]).all()
    assert set(np.unique(loose)) == {0.0, 1.0}                           # hard labels: 0 for every other class


def test_labelled_test_clips_skip_the_undecodable_and_carry_the_labels():
    mels = [np.zeros((4, 10), np.float16), None, np.ones((4, 12), np.float16)]
    test = MelStore(ClipTable("test", ["a.wav", "b.wav", "c.wav"], [None] * 3), mels)
    labels = np.array([[1, 0], [0, 1]], np.float32)             # one row per decodable clip: a, c
    clips = labelled_test(test, labels)
    assert clips.indices.tolist() == [0, 2]
    assert clips.targets.tolist() == [[1, 0], [0, 1]]
    assert clips.store.mels is test.mels and test.table.targets is None  # the test store itself is unchanged


def test_the_round_only_gets_the_time_the_rest_of_the_recipe_leaves():
    cfg = make_config("cpu", sets=["pseudo_epochs=10"])
    free = plan_run(cfg, WORKLOAD, CPU, None)
    assert free.epochs_pseudo == 10 and dict(free.stages)[ROUND_STAGE] > 0
    recipe = plan_run(NO_ROUND, WORKLOAD, CPU, None)                       # the same recipe without the round
    assert ROUND_STAGE not in dict(recipe.stages) and recipe.total_s < free.total_s
    assert (free.epochs_noisy, free.epochs_curated) == (recipe.epochs_noisy, recipe.epochs_curated)
    some = plan_run(cfg, WORKLOAD, CPU, (recipe.total_s + free.total_s) / 2)  # room for part of the round
    assert 0 < some.epochs_pseudo < 10 and some.total_s <= (recipe.total_s + free.total_s) / 2
    assert (some.epochs_noisy, some.epochs_curated, some.folds_trained) == (   # nothing else cut
        cfg.noisy.epochs, cfg.curated.epochs, cfg.folds)
    assert any("pseudo-label round cut" in n for n in some.notes)
    tight = plan_run(cfg, WORKLOAD, CPU, 0.8 * recipe.total_s)              # not even the recipe fits: no round
    assert tight.epochs_pseudo == 0 and ROUND_STAGE not in dict(tight.stages)
    assert (tight.epochs_noisy, tight.epochs_curated) == (lambda p: (p.epochs_noisy, p.epochs_curated))(
        plan_run(NO_ROUND, WORKLOAD, CPU, 0.8 * recipe.total_s))


def test_the_round_is_priced_by_its_clips_and_the_labelling_pass():
    cfg = make_config("cpu", sets=["pseudo_epochs=10"])
    c = stage_costs(cfg, WORKLOAD, CPU, 0)
    more_test = stage_costs(cfg, Workload(**{**WORKLOAD.__dict__, "test_clips": 600, "test_windows": 2000}), CPU, 0)
    assert more_test["pseudo_epoch"] - c["pseudo_epoch"] == pytest.approx(300 / 150 * 1.15)
    assert more_test["teacher_predict"] == pytest.approx(2 * c["teacher_predict"])
    assert c["pseudo_epoch"] > c["fold_epoch"]


def test_the_round_takes_what_time_is_left_when_it_starts():
    cfg = make_config("cpu", sets=["pseudo_epochs=10"])
    b = budget(cfg, time.time() + 10_000)
    c = b.costs(0)
    fixed = 3 * (c["test_predict"] + c["teacher_predict"])
    b.deadline = time.time() + fixed + 4.5 * 3 * c["pseudo_epoch"]      # 4 epochs of 3 models fit
    assert b.pseudo_epochs(3) == 4 and b.plan.epochs_pseudo == 4
    assert any("pseudo-label round: 4 epochs" in n for n in b.plan.notes)
    b.deadline = time.time() + 1000 * fixed                               # plenty: the requested number, no more
    assert b.pseudo_epochs(3) == 10
    b.deadline = time.time() + 0.5 * fixed                                # not even the test pass: no round
    assert b.pseudo_epochs(3) == 0
    assert budget(cfg, None).pseudo_epochs(3) == 10                       # no budget: as requested
    assert Budget(cfg, None).pseudo_epochs(3) == 10                       # (before anything is measured too)
    assert budget(NO_ROUND, time.time() + 10_000).pseudo_epochs(3) == 0   # no round asked for
    d = budget(cfg, time.time() + 10_000)                                 # model k leaves the later ones an epoch
    assert d.pseudo_deadline(2, 3) - d.pseudo_deadline(0, 3) == pytest.approx(2 * d.costs(0)["pseudo_epoch"])
    assert d.deadline - d.pseudo_deadline(2, 3) == pytest.approx(3 * d.costs(0)["test_predict"])


def test_stage_2_leaves_the_planned_round_its_time():
    cfg = make_config("cpu", sets=["pseudo_epochs=10"])
    with_round, without = (budget(c, time.time() + 10_000) for c in (cfg, NO_ROUND))
    assert with_round.epochs_for(0) == without.epochs_for(0) == 30 and with_round.plan.epochs_pseudo == 10
    c = with_round.costs()
    for k in (0, 1):  # fold k's deadline keeps the round of the k + 1 models trained by then
        gap = without.fold_deadline(k) - with_round.fold_deadline(k)
        assert gap == pytest.approx((k + 1) * (c["teacher_predict"] + 10 * c["pseudo_epoch"]), rel=1e-3)

"""covpool.train.config_checks: the registry names it accepts are the ones the registries take (the mistakes
themselves are tested on the command line, tests/test_cli.py)."""
from __future__ import annotations

import pytest

from covpool.train.config import SCHEDULERS, ConfigError, load_config
from covpool.train.config_checks import check_config


@pytest.mark.parametrize("sched", SCHEDULERS)
def test_every_listed_scheduler_is_one_timm_builds_for_a_per_step_schedule(sched):
    """timm keeps no list of its schedulers: covpool's list is checked against timm's factory here."""
    check_config(load_config(None, ["model.name=test_resnet", f"optim.sched={sched}", "optim.warmup_epochs=1",
                                    "optim.decay_epochs=1", "epochs=10"]))


def test_names_the_registries_take_in_other_spellings_are_accepted():
    ok = ["model.name=test_resnet.r160_in1k", "optim.opt=lookahead_adamw", "optim.opt=AdamW", "compile=aot_eager",
          "model.swap_pooling=true", "model.covpool.reduced_dim=8", "model.covpool.backend={name: ns, num_iters: 3}"]
    check_config(load_config(None, ok))
    with pytest.raises(ConfigError, match="optim.sched='plateau' is not a timm scheduler covpool can step"):
        check_config(load_config(None, ["model.name=test_resnet", "optim.sched=plateau"]))
    with pytest.raises(ConfigError, match="optim.opt='foo_adamw' is not a timm optimizer"):
        check_config(load_config(None, ["model.name=test_resnet", "optim.opt=foo_adamw"]))

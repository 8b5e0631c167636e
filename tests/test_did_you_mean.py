"""A mistyped flag, method, dataset or model names what was probably meant (issue 25), on the one error line."""
from __future__ import annotations

import pytest

from mtil.main import main
from mtil.flags import close_matches


@pytest.mark.parametrize(("argv", "fragment"), [
    (["--metod", "ZSCL"], "did you mean: --metod -> --method"),
    (["--batchsize", "8"], "--batchsize -> --batch-size"),
    (["--lr_mult_vision=0.5", "--train-dataset", "ToyShape"], None),  # the other spelling is accepted
    (["--method", "zscl", "--train-dataset", "ToyShape"], "(did you mean ZSCL?)"),
    (["--method", "fintune", "--train-dataset", "ToyShape"], "(did you mean finetune?)"),
    (["--eval-only", "--model", "micro-vt", "--eval-datasets", "ToyShape", "--device", "cpu"],
     "(did you mean micro-vit?)"),
    (["--eval-only", "--model", "micro-vit", "--eval-datasets", "Toyshap", "--device", "cpu"],
     "(did you mean ToyShape?)"),
    (["--eval-only", "--model", "micro-vit", "--eval-datasets", "cifar-10", "--device", "cpu"],
     "(did you mean CIFAR10 or CIFAR100?)"),
])
def test_the_error_line_says_what_was_meant(argv, fragment, capsys):
    code = main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    if fragment is None:  # not a typo: no suggestion (the run may fail for other reasons)
        assert not any("did you mean" in line for line in err)
        return
    assert code == 2 and len(err) == 1 and fragment in err[0], err


def test_close_matches_ignores_case_and_underscores_and_finds_nothing_far():
    assert close_matches("vit-b/32", ["ViT-B/32", "ViT-B/16"])[0] == "ViT-B/32"
    assert close_matches("--batch_size", ["--batch-size"]) == ["--batch-size"]
    assert close_matches("qwertyuiop", ["finetune", "ZSCL"]) == []

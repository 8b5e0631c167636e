"""The shipped sequence files agree with the datasets they name."""
import pytest

from mtil.datasets.toyworld import BUILTIN_ORDER
from mtil.engine.tasks import NAMED_ORDERS, read_sequence_file

PAPER_ORDER_1 = ["Aircraft", "Caltech101", "CIFAR100", "DTD", "EuroSAT", "Flowers", "Food", "MNIST", "OxfordPet",
                 "StanfordCars", "SUN397"]


def test_toyworld_order_is_the_builtin_order():
    assert [t.dataset for t in read_sequence_file(NAMED_ORDERS["ToyWorld"])] == BUILTIN_ORDER


def test_mtil_orders_follow_the_paper():
    order1 = [t.dataset for t in read_sequence_file(NAMED_ORDERS["MTIL-I"])]
    order2 = [t.dataset for t in read_sequence_file(NAMED_ORDERS["MTIL-II"])]
    assert order1 == PAPER_ORDER_1
    assert order2 == [PAPER_ORDER_1[i] for i in [9, 6, 7, 8, 5, 10, 0, 1, 3, 4, 2]]


@pytest.mark.parametrize("order", ["MTIL-I", "MTIL-II"])
def test_paper_learning_rates(order):
    for task in read_sequence_file(NAMED_ORDERS[order]):
        assert task.overrides["lr"] == (5e-5 if task.dataset in ("Aircraft", "MNIST") else 1e-5)

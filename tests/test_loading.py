"""Names that are neither local paths nor loadable hub ids fail at once, with one message."""

import pytest

from distil import loading
from distil.errors import DistilError


@pytest.fixture(autouse=True)
def fresh_lookups():
    loading._hub_problem.cache_clear()
    yield
    loading._hub_problem.cache_clear()


def test_hub_name_with_the_hub_switched_off_fails_at_once(monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(DistilError, match=r"'bert-base-uncasd' is not a local path, and the hub is switched off"):
        loading.check_exists("bert-base-uncasd", "teacher")


def test_unreachable_hub_is_asked_once_and_explained(monkeypatch):
    from huggingface_hub import HfApi, constants

    calls = []

    def unreachable(self, repo_id, timeout=None):
        calls.append(repo_id)
        raise ConnectionError("Name or service not known")

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(HfApi, "model_info", unreachable)
    for _ in range(2):
        with pytest.raises(DistilError, match="cannot be reached from this machine .Name or service not known."):
            loading.check_exists("teacher", "reference model")
    assert calls == ["teacher"]


def test_unknown_hub_name_and_missing_local_path(monkeypatch, tmp_path):
    from huggingface_hub import HfApi, constants
    from huggingface_hub.errors import RepositoryNotFoundError

    def missing(self, repo_id, timeout=None):
        error = RepositoryNotFoundError.__new__(RepositoryNotFoundError)  # as the hub's 404 answer raises it
        Exception.__init__(error, "404 Client Error: Repository Not Found")
        raise error

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(HfApi, "model_info", missing)
    with pytest.raises(DistilError, match="the hub has no model of that name"):
        loading.check_exists("someone/no-such-model", "teacher")
    with pytest.raises(DistilError, match="path .* does not exist"):
        loading.check_exists(str(tmp_path / "nope"), "teacher")
    loading.check_exists(str(tmp_path), "teacher")  # an existing local path passes


def test_evaluate_checks_every_model_before_evaluating_the_first(monkeypatch, tmp_path):
    from distil.evaluation import evaluate as evaluate_module
    from distil.evaluation import lm_quality

    loaded = []
    monkeypatch.setattr(lm_quality, "load_eval_model", lambda *a, **k: loaded.append(a))
    with pytest.raises(DistilError, match=r"The model student path .*typo does not exist"):
        evaluate_module.evaluate([f"teacher={tmp_path}", f"student={tmp_path / 'typo'}"], progress=False)
    assert loaded == []

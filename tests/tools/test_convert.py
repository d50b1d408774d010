"""`servekit convert sklearn`: scikit-learn models trained on digits, served as ONNX."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import joblib
import numpy as np
import pytest
from sklearn.datasets import load_digits
from sklearn.linear_model import LogisticRegression, Ridge

from tests.conftest import ServerProcess


def run(*arguments: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "servekit", "convert", "sklearn", *arguments],
        capture_output=True, text=True, timeout=180,
    )  # fmt: skip


@pytest.fixture
def digits(tmp_path: Path) -> tuple[np.ndarray[Any, Any], np.ndarray[Any, Any]]:
    data = load_digits()
    np.save(tmp_path / "sample.npy", data.data[1500:].astype(np.float32))
    return data.data[:1500], data.target[:1500]


def test_classifier_is_served_with_the_same_predictions(
    tmp_path: Path, digits: tuple[np.ndarray[Any, Any], np.ndarray[Any, Any]]
) -> None:
    features, labels = digits
    model = LogisticRegression(max_iter=300).fit(features, labels)
    joblib.dump(model, tmp_path / "model.joblib")
    folder = tmp_path / "repository" / "digits_lr"
    result = run(
        str(tmp_path / "model.joblib"), "--output", str(folder),
        "--sample", str(tmp_path / "sample.npy"), "--allow-pickle", "--tolerance", "1e-4",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["kind"] == "classifier"
    assert report["label_agreement"] == 1.0
    assert report["rows_compared"] == 297
    assert "runs code" in result.stderr  # the warning naming the pickled file

    sample = np.load(tmp_path / "sample.npy")
    server = ServerProcess("--model_repository", str(folder.parent))
    try:
        response = httpx.post(
            f"{server.url}/v1/models/digits_lr:predict",
            json={"instances": sample[:50].tolist()},
        )
    finally:
        server.stop()
    served = [row["label"] for row in response.json()["predictions"]]
    assert served == model.predict(sample[:50]).tolist()


def test_regressor_within_tolerance(
    tmp_path: Path, digits: tuple[np.ndarray[Any, Any], np.ndarray[Any, Any]]
) -> None:
    features, labels = digits
    joblib.dump(Ridge().fit(features, labels), tmp_path / "ridge.joblib")
    result = run(
        str(tmp_path / "ridge.joblib"), "--output", str(tmp_path / "ridge"),
        "--sample", str(tmp_path / "sample.npy"), "--allow-pickle", "--tolerance", "1e-3",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["max_difference"] < 1e-3
    assert (tmp_path / "ridge" / "1" / "model.onnx").is_file()


def test_pickle_needs_permission_and_loads_nothing(tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    # A pickle that would create a file if it were ever loaded.
    (tmp_path / "evil.pkl").write_bytes(
        b"cos\nsystem\n(S'touch " + str(marker).encode() + b"'\ntR."
    )
    np.save(tmp_path / "sample.npy", np.zeros((2, 3), np.float32))
    result = run(
        str(tmp_path / "evil.pkl"), "--output", str(tmp_path / "out"),
        "--sample", str(tmp_path / "sample.npy"),
    )  # fmt: skip
    assert result.returncode == 1
    assert "--allow-pickle" in result.stderr
    assert not marker.exists()
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("kind", ["xgboost", "lightgbm", "hist_gradient_boosting", "xgb_reg"])
def test_gradient_boosting_models_convert(
    tmp_path: Path, digits: tuple[np.ndarray[Any, Any], np.ndarray[Any, Any]], kind: str
) -> None:
    import lightgbm
    import xgboost
    from sklearn.ensemble import HistGradientBoostingClassifier

    features, labels = digits
    model = {
        "xgboost": lambda: xgboost.XGBClassifier(n_estimators=20, max_depth=3, n_jobs=1),
        "lightgbm": lambda: lightgbm.LGBMClassifier(n_estimators=20, verbose=-1, n_jobs=1),
        "hist_gradient_boosting": lambda: HistGradientBoostingClassifier(max_iter=20),
        "xgb_reg": lambda: xgboost.XGBRegressor(n_estimators=20, max_depth=3, n_jobs=1),
    }[kind]().fit(features.astype(np.float32), labels)
    joblib.dump(model, tmp_path / "model.joblib")
    folder = tmp_path / "repository" / kind
    result = run(
        str(tmp_path / "model.joblib"), "--output", str(folder),
        "--sample", str(tmp_path / "sample.npy"), "--allow-pickle",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout[result.stdout.index("{\n") :])
    assert report["max_difference"] <= 1e-4
    if kind == "xgb_reg":
        assert report["kind"] == "regressor"
    else:
        assert report["label_agreement"] == 1.0

    # The pickle itself is served too, with --allow_pickle, beside its ONNX conversion.
    pickled = folder.parent / f"{kind}_pickle" / "1"
    pickled.mkdir(parents=True)
    (tmp_path / "model.joblib").rename(pickled / "model.joblib")
    sample = np.load(tmp_path / "sample.npy")
    server = ServerProcess("--model_repository", str(folder.parent), "--allow_pickle")
    try:
        responses = [
            httpx.post(
                f"{server.url}/v1/models/{name}:predict", json={"instances": sample[:40].tolist()}
            )
            for name in (kind, f"{kind}_pickle")
        ]
    finally:
        server.stop()
    for response in responses:
        assert response.status_code == 200, response.text
        if kind == "xgb_reg":
            served = np.array(response.json()["predictions"]).ravel()
            assert np.allclose(served, model.predict(sample[:40]), atol=1e-4)
        else:
            served_labels = [row["label"] for row in response.json()["predictions"]]
            assert served_labels == model.predict(sample[:40]).tolist()


def test_sample_errors_are_one_line(
    tmp_path: Path, digits: tuple[np.ndarray[Any, Any], np.ndarray[Any, Any]]
) -> None:
    features, labels = digits
    joblib.dump(LogisticRegression(max_iter=300).fit(features, labels), tmp_path / "m.joblib")
    np.save(tmp_path / "narrow.npy", np.zeros((5, 63), np.float32))
    (tmp_path / "garbage.npy").write_bytes(b"not an array")
    for sample, expected in (
        ("narrow.npy", "has rows of 63 values, but the model takes 64 features"),
        ("garbage.npy", "is not a NumPy .npy file of plain arrays"),
    ):
        result = run(str(tmp_path / "m.joblib"), "--output", str(tmp_path / "out"),
                     "--sample", str(tmp_path / sample), "--allow_pickle")  # fmt: skip
        assert result.returncode == 1
        assert expected in result.stderr
        assert "Traceback" not in result.stderr
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())

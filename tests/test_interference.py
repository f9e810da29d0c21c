import numpy as np
import pytest

from kdsl_utils.interference import compare, interference_table


def test_sum_of_updates_is_fully_explained():
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=200), rng.normal(size=200)
    s = compare(a, b, a + b)
    assert s["r2_both"] == pytest.approx(1.0)
    assert s["a_img"] == pytest.approx(1.0) and s["b_int"] == pytest.approx(1.0)
    assert abs(s["cos_img_int"]) < 0.25  # random directions are near orthogonal
    assert s["r2_img"] + s["r2_int"] == pytest.approx(1.0, abs=0.1)


def test_opposing_and_novel_updates():
    a = np.array([1.0, 0, 0])
    s = compare(a, -a, np.array([0, 0, 2.0]))
    assert s["cos_img_int"] == pytest.approx(-1.0)
    assert s["r2_both"] == pytest.approx(0.0) and s["r2_img"] == pytest.approx(0.0)
    assert s["norm_joint"] == pytest.approx(2.0)


def test_table_per_layer_and_all():
    rng = np.random.default_rng(1)
    img = {"l0": rng.normal(size=(4, 3)), "l1": rng.normal(size=5)}
    inn = {"l0": rng.normal(size=(4, 3)), "l1": rng.normal(size=5)}
    joint = {k: 0.5 * img[k] + 2 * inn[k] for k in img}
    t = interference_table(img, inn, joint)
    assert list(t["layer"]) == ["l0", "l1", "ALL"]
    assert np.allclose(t["a_img"], 0.5) and np.allclose(t["b_int"], 2.0)
    with pytest.raises(ValueError, match="same parameter names"):
        interference_table(img, {"l0": inn["l0"]}, joint)

import pytest

from asmkit import PRESETS, Params, parse_size
from asmkit._validation import ArgumentError
from asmkit.config import PipelineConfig, load_config, preset_names
from asmkit.params import preset_table


@pytest.mark.parametrize("text,value", [("64k", 65536), ("1M", 1048576), ("4096", 4096), (1024, 1024)])
def test_parse_size(text, value):
    assert parse_size(text) == value


@pytest.mark.parametrize("bad", ["", "k", "12x", 0, -5, 3.5, True, None])
def test_parse_size_rejects(bad):
    with pytest.raises(ArgumentError, match="codebook_size"):
        parse_size(bad)


def test_defaults_match_reference_defaults():
    p = Params()
    assert (p.codebook_size, p.binary, p.use_idf, p.alpha, p.tau, p.ma_database, p.ma_query) == (
        65536,
        True,
        False,
        3.0,
        0.0,
        1,
        5,
    )


@pytest.mark.parametrize(
    "field,value",
    [
        ("alpha", -1.0),
        ("alpha", float("nan")),
        ("tau", 2.0),
        ("ma_query", 0),
        ("binary", "yes"),
        ("binary", 1),
        ("topk", 0),
        ("kmeans_iters", 1.5),
        ("ma_query", 2.5),
        ("seed", "1"),
        ("codebook_size", 2.5),
        ("use_idf", None),
    ],
)
def test_validation_names_the_field(field, value):
    with pytest.raises(ArgumentError, match=f"^{field}: "):
        Params(**{field: value})


def test_unknown_parameter_is_named():
    with pytest.raises(ValueError, match="multiple_asignment"):
        Params.from_dict({"multiple_asignment": 3})


def test_unknown_preset():
    with pytest.raises(ValueError, match="nope"):
        Params.preset("nope")


def test_reference_round_trip():
    p = Params(codebook_size=1024, binary=False, use_idf=True, alpha=2.0, tau=0.1, ma_query=3, topk=10)
    ref = p.to_reference()
    assert ref["query_ivf"]["similarity"] == {"similarity_threshold": 0.1, "alpha": 2.0}
    q = Params.from_reference(ref)
    assert q.replace(seed=p.seed, kmeans_iters=p.kmeans_iters) == p


def test_reference_shortcuts_and_unknown_keys():
    ref = PRESETS["asmk_star"].to_reference()
    ref["build_ivf"]["kernel"]["binary"] = "nobin"
    ref["train_codebook"]["codebook"]["size"] = "8k"
    p = Params.from_reference(ref)
    assert p.binary is False and p.codebook_size == 8192
    ref["query_ivf"]["serch"] = {}
    with pytest.raises(ValueError, match="serch"):
        Params.from_reference(ref)


def test_shipped_presets_load():
    assert {"sift", "sift_hq", "deep", "mast3r"} <= set(preset_names())
    for name in preset_names():
        if "hybrid" in preset_table(name):
            continue
        cfg = load_config(name)
        assert cfg.features["type"] in {"sift", "deep", "mast3r"}
        assert PipelineConfig.from_dict(cfg.to_dict()).params == cfg.params


def test_config_file_overlay_and_overrides(tmp_path):
    f = tmp_path / "my.toml"
    f.write_text("[features]\nmax_features = 2000\n[asmk]\nuse_idf = true\n")
    cfg = load_config("sift", f, codebook_size="8k", alpha=None)
    assert cfg.features == {"type": "sift", "max_features": 2000, "root": True}
    assert cfg.params.use_idf and cfg.params.codebook_size == 8192 and cfg.params.alpha == 3.0


def test_config_errors(tmp_path):
    with pytest.raises(ValueError, match="unknown preset 'bogus'"):
        load_config("bogus")
    with pytest.raises(FileNotFoundError, match="missing.toml"):
        load_config("sift", tmp_path / "missing.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("[asmk]\nalpah = 3\n")
    with pytest.raises(ValueError, match="alpah"):
        load_config("sift", bad)
    bad.write_text("[asmkk]\n")
    with pytest.raises(ValueError, match="asmkk"):
        load_config("sift", bad)

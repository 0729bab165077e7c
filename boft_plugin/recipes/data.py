"""Recipe data: local files, in-memory datasets or hub names, checked before any model is loaded.

Sources, in order of precedence:

1. in-memory ``datasets.Dataset`` / ``IterableDataset`` / ``DatasetDict`` passed to the Python API;
2. TRL's ``datasets:`` mixture (each entry's ``path`` may be a local file, a directory, a builder such as
   ``json`` with ``data_files``, or a hub name);
3. ``dataset_name``: a local ``.json``/``.jsonl``/``.parquet``/``.csv``/``.arrow``/``.txt`` file, a local
   directory (data files, or a ``save_to_disk`` dataset), or a hub name passed to ``datasets.load_dataset``.

Evaluation data (only when evaluation is requested or ``eval_dataset_name`` is set): ``eval_dataset_name``, else
the ``dataset_test_split`` split of the source, else TRL's ``test_split_size`` split.

Columns accepted, as TRL 1.16 reads them:

- SFT: ``text`` (or ``dataset_text_field``), ``messages`` (conversational, needs a chat template),
  ``conversations`` (ShareGPT ``from``/``value``), ``prompt`` + ``completion`` (plain or conversational), or
  pre-tokenised ``input_ids``;
- DPO: ``chosen`` + ``rejected``, with ``prompt`` (explicit) or without (TRL extracts the shared prefix);
- KTO: ``prompt`` + ``completion`` + ``label`` (unpaired: a boolean, desirable or not), or DPO's preference rows,
  which TRL unpairs into one desirable and one undesirable row each;
- GRPO / RLOO: ``prompt``; every other column reaches the reward functions (``.rewards``).
"""

from __future__ import annotations

import os
from typing import Any

from ..errors import RecipeError

BUILDERS = {
    ".json": "json",
    ".jsonl": "json",
    ".parquet": "parquet",
    ".csv": "csv",
    ".arrow": "arrow",
    ".txt": "text",
}


def _looks_local(source: str) -> bool:
    return (
        source.startswith((".", "/", "~"))
        or os.path.splitext(source)[1].lower() in BUILDERS
        or os.sep in source.strip("/").split("/", 1)[-1]
    )


def _builder_for(path: str, key: str) -> str:
    extension = os.path.splitext(path)[1].lower()
    if extension not in BUILDERS:
        raise RecipeError(
            f"recipe key '{key}': cannot read {path} (extension {extension or 'none'}); supported: "
            f"{', '.join(sorted(BUILDERS))}"
        )
    return BUILDERS[extension]


def check_json_file(path: str, key: str) -> None:
    """Raise :class:`RecipeError` naming the file and the line when a ``.json`` / ``.jsonl`` file is not valid JSON.

    ``datasets`` reports such a file with a long traceback and no line number. A ``.json`` file may hold one JSON
    document or JSON lines (as ``datasets`` accepts both); a ``.jsonl`` file is read line by line.
    """
    import json

    if os.path.splitext(path)[1].lower() not in (".json", ".jsonl"):
        return
    if path.lower().endswith(".json"):
        try:
            with open(path, encoding="utf-8") as handle:
                json.load(handle)
            return
        except json.JSONDecodeError as whole_error:
            if not _first_line_is_json(path):  # one (broken) JSON document, not JSON lines
                raise RecipeError(
                    f"recipe key '{key}': {path} line {whole_error.lineno}, column {whole_error.colno}: not valid "
                    f"JSON ({whole_error.msg})"
                ) from None
        except UnicodeDecodeError as err:
            raise RecipeError(f"recipe key '{key}': {path} is not UTF-8 text ({err.reason})") from None
    try:
        with open(path, encoding="utf-8") as handle:
            for number, line in enumerate(handle, start=1):
                if line.strip():
                    try:
                        json.loads(line)
                    except json.JSONDecodeError as err:
                        raise RecipeError(
                            f"recipe key '{key}': {path} line {number}, column {err.colno}: not valid JSON "
                            f"({err.msg}); each line must be one JSON object"
                        ) from None
    except UnicodeDecodeError as err:
        raise RecipeError(f"recipe key '{key}': {path} is not UTF-8 text ({err.reason})") from None


def _first_line_is_json(path: str) -> bool:
    import json

    with open(path, encoding="utf-8") as handle:
        first = next((line for line in handle if line.strip()), "")
    try:
        json.loads(first)
    except json.JSONDecodeError:
        return False
    return True


def _read_file(path: str, key: str, streaming: bool):
    """One local data file as a ``datasets`` split, any reader error reported in one line."""
    import datasets

    check_json_file(path, key)
    try:
        return datasets.load_dataset(_builder_for(path, key), data_files=path, split="train", streaming=streaming)
    except datasets.exceptions.DatasetGenerationError as err:
        cause = err.__cause__ or err.__context__ or err
        raise RecipeError(f"recipe key '{key}': cannot read {path}: {str(cause).splitlines()[0]}") from None


def load_source(
    source: str,
    key: str,
    split: str | None = "train",
    name: str | None = None,
    streaming: bool = False,
):
    """Load one dataset source (file, directory or hub name); ``split=None`` returns every split (a dict)."""
    import datasets

    path = os.path.expanduser(source)
    if os.path.isfile(path):
        loaded = _read_file(path, key, streaming)
        return loaded if split is not None else {"train": loaded}
    if os.path.isdir(path):
        if any(os.path.isfile(os.path.join(path, f)) for f in ("dataset_dict.json", "state.json")):
            loaded = datasets.load_from_disk(path)
        else:
            loaded = datasets.load_dataset(path, streaming=streaming)
        if isinstance(loaded, datasets.Dataset | datasets.IterableDataset):
            loaded = {"train": loaded}
        if split is None:
            return dict(loaded)
        if split not in loaded:
            raise RecipeError(f"recipe key '{key}': {path} has splits {sorted(loaded)}, not '{split}'")
        return loaded[split]
    if _looks_local(source):
        raise RecipeError(f"recipe key '{key}': dataset file or directory {source} does not exist")
    hub_error = _hub_unreachable()  # one quick try instead of datasets' retries (~30 s) when there is no network
    try:
        if hub_error:
            raise ConnectionError(f"the hub is unreachable ({hub_error}); set HF_DATASETS_OFFLINE=1 for a cached copy")
        loaded = datasets.load_dataset(source, name=name, split=split, streaming=streaming)
    except Exception as err:  # noqa: BLE001 - the hub raises many types; all mean "cannot load this name"
        raise RecipeError(
            f"recipe key '{key}': could not load dataset {source!r} from the Hugging Face hub "
            f"({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}). Local data must be an existing "
            "file or directory."
        ) from None
    return dict(loaded) if split is None else loaded


def _offline() -> bool:
    return any(
        os.environ.get(v, "").lower() in ("1", "true", "yes", "on") for v in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")
    )


def _hub_unreachable(timeout_s: float = 3.0) -> str | None:
    """None when the hub answers (or offline mode is on: then ``datasets`` looks in its cache, quickly); else why."""
    if _offline():
        return None
    import urllib.error
    import urllib.request

    from huggingface_hub import constants

    try:
        urllib.request.urlopen(constants.ENDPOINT, timeout=timeout_s).close()  # noqa: S310 - the configured endpoint
    except urllib.error.HTTPError:
        return None  # it answered
    except (OSError, ValueError) as err:
        return f"{type(err).__name__}: {getattr(err, 'reason', err)}"
    return None


def _mixture(mixture, key: str = "datasets"):
    """TRL's ``get_dataset`` with local file paths resolved to builders and missing files reported first."""
    import copy

    from trl import get_dataset

    resolved = copy.deepcopy(mixture)
    for index, entry in enumerate(resolved.datasets):
        where = f"{key}[{index}]"
        files = entry.data_files
        file_list = [files] if isinstance(files, str) else list(files.values()) if isinstance(files, dict) else files
        for file in file_list or []:
            for item in [file] if isinstance(file, str) else file:
                if not any(ch in item for ch in "*?[") and "://" not in item:
                    if not os.path.exists(item):
                        raise RecipeError(f"recipe key '{where}.data_files': dataset file {item} does not exist")
                    check_json_file(item, f"{where}.data_files")
        path = os.path.expanduser(entry.path)
        if os.path.isfile(path):
            check_json_file(path, f"{where}.path")
            entry.path, entry.data_files = _builder_for(path, f"{where}.path"), path
        elif not os.path.isdir(path) and file_list is None and _looks_local(entry.path):
            raise RecipeError(f"recipe key '{where}.path': dataset file or directory {entry.path} does not exist")
    try:
        return dict(get_dataset(resolved))
    except RecipeError:
        raise
    except Exception as err:  # noqa: BLE001
        raise RecipeError(
            f"recipe key '{key}': could not load the dataset mixture ({type(err).__name__}: {err})"
        ) from err


def column_names(dataset) -> list[str]:
    names = getattr(dataset, "column_names", None)
    if names is None:  # streaming without known features
        names = list(next(iter(dataset)).keys())
    return list(names)


def check_columns(dataset, task: str, where: str, text_field: str = "text") -> None:
    """Raise :class:`RecipeError` naming ``where`` and the columns found when TRL could not train on them."""
    names = column_names(dataset)
    present = set(names)
    if task == "sft":
        options = [{"input_ids"}, {text_field}, {"messages"}, {"conversations"}, {"prompt", "completion"}]
        expected = (
            f"'{text_field}' (dataset_text_field), 'messages', 'conversations', 'prompt'+'completion' or 'input_ids'"
        )
    elif task == "kto":  # unpaired; paired preference rows are unpaired by TRL (one desirable, one undesirable)
        options = [{"prompt", "completion", "label"}, {"chosen", "rejected"}]
        expected = "'prompt'+'completion'+'label' (unpaired), or preference rows 'chosen'+'rejected' (TRL unpairs them)"
    elif task in ("grpo", "rloo"):  # online RL: TRL generates the completions
        options = [{"prompt"}]
        expected = "'prompt' (plain or conversational; other columns are passed to the reward functions)"
    else:
        options = [{"chosen", "rejected"}]
        expected = "'prompt'+'chosen'+'rejected' (or 'chosen'+'rejected' with the prompt as shared prefix)"
    if not any(option <= present for option in options):
        raise RecipeError(f"{where}: columns {names} found; {task.upper()} expects {expected}")
    try:
        length = len(dataset)
    except TypeError:
        length = None
    if length == 0:
        raise RecipeError(f"{where}: the dataset is empty")
    if task == "kto" and {"chosen", "rejected"} <= present:
        import warnings

        warnings.warn(
            f"{where}: KTO on preference rows: TRL unpairs them in blocks (every chosen row of up to 1000 pairs, then "
            "every rejected one) and KTO reads rows in order, so its batches hold one kind at a time; unpaired rows "
            "with both kinds mixed train on both every step (docs/trl.md, KTO); a 'label' column beside them is "
            "ignored",
            stacklevel=2,
        )
    elif task == "kto":
        _check_kto_labels(dataset, where, length)


def _check_kto_labels(dataset, where: str, length: int | None) -> None:
    """KTO's ``label`` says whether a completion is desirable: true/false (or 0/1) on every row (the first row of a
    streaming dataset). TRL counts the desirable rows with ``sum`` and makes a bool tensor per batch, so a string
    fails in its collator after the model loaded, and 2 or -1 would count in the desirable/undesirable balance as
    that number."""
    if length is not None:
        labels = dataset["label"]
    else:
        first = next(iter(dataset), None)
        labels = [] if first is None else [first["label"]]
    for index, label in enumerate(labels):
        if hasattr(label, "item") and getattr(label, "ndim", 0) == 0:  # a numpy / torch formatted dataset
            label = label.item()
        if not (isinstance(label, bool) or (isinstance(label, int) and label in (0, 1))):
            raise RecipeError(
                f"{where}: column 'label' row {index} is {label!r} ({type(label).__name__}); KTO needs true/false "
                "(desirable or not) on every row"
            )


def first_row(dataset) -> dict:
    """The dataset's first row (a streaming dataset's first item)."""
    try:
        example = dataset[0] if hasattr(dataset, "__getitem__") and not isinstance(dataset, dict) else None
    except (IndexError, KeyError, TypeError):
        example = None
    return example if example is not None else next(iter(dataset))


def is_conversational_dataset(dataset) -> bool:
    from trl.data_utils import is_conversational

    example = first_row(dataset)
    return bool(is_conversational(example)) or "conversations" in example


def _describe(recipe, key: str) -> str:
    if key == "dataset_name":
        return f"dataset {recipe.script.dataset_name} (recipe key 'dataset_name')"
    if key == "eval_dataset_name":
        return f"evaluation dataset {recipe.options.eval_dataset_name} (recipe key 'eval_dataset_name')"
    return f"dataset from recipe key '{key}'"


def wants_eval(training) -> bool:
    strategy = getattr(training.eval_strategy, "value", training.eval_strategy)
    return strategy != "no" or bool(getattr(training, "eval_on_start", False))


def load_recipe_data(recipe, train_dataset: Any = None, eval_dataset: Any = None) -> tuple[Any, Any]:
    """(train, eval or None) for ``recipe``, columns checked; raises :class:`RecipeError` before any model load."""
    import datasets

    script, mixture, training = recipe.script, recipe.mixture, recipe.training
    train_split, test_split = script.dataset_train_split, script.dataset_test_split
    splits: dict[str, Any] | None = None
    key = "dataset_name"
    if train_dataset is not None:
        key = "train_dataset (Python API)"
        if isinstance(train_dataset, datasets.DatasetDict | datasets.IterableDatasetDict | dict):
            splits = dict(train_dataset)
        else:
            splits = {train_split: train_dataset}
    elif mixture.datasets:
        key = "datasets"
        splits = _mixture(mixture)
    elif script.dataset_name:
        splits = load_source(
            script.dataset_name,
            "dataset_name",
            split=None,
            name=script.dataset_config,
            streaming=script.dataset_streaming,
        )
    else:
        raise RecipeError(
            f"no training data: set 'dataset_name' (a local file, directory or hub name) or 'datasets' in the "
            f"recipe, or pass train_dataset to the Python API (`boft-plugin {recipe.task}`)"
        )
    where = _describe(recipe, key) if key in ("dataset_name", "datasets") else key
    if key != "datasets" and mixture.test_split_size and test_split not in splits and train_split in splits:
        # TRL applies test_split_size to its mixture only; a recipe applies it to any single source too
        parts = splits[train_split].train_test_split(test_size=mixture.test_split_size, seed=training.seed)
        splits = {**splits, train_split: parts["train"], test_split: parts["test"]}
    if train_split not in splits:
        raise RecipeError(f"{where}: has splits {sorted(splits)}, not '{train_split}' (key 'dataset_train_split')")
    train = splits[train_split]
    text_field = getattr(training, "dataset_text_field", "text")
    check_columns(train, recipe.task, where, text_field)

    evaluation = None
    if eval_dataset is not None:
        evaluation = eval_dataset
        check_columns(evaluation, recipe.task, "eval_dataset (Python API)", text_field)
    elif recipe.options.eval_dataset_name:
        evaluation = load_source(
            recipe.options.eval_dataset_name,
            "eval_dataset_name",
            split=test_split if not os.path.isfile(os.path.expanduser(recipe.options.eval_dataset_name)) else "train",
            streaming=script.dataset_streaming,
        )
        check_columns(evaluation, recipe.task, _describe(recipe, "eval_dataset_name"), text_field)
    elif wants_eval(training):
        if test_split in splits:
            evaluation = splits[test_split]
            check_columns(evaluation, recipe.task, f"{where}, split '{test_split}'", text_field)
        else:
            raise RecipeError(
                f"evaluation is requested (eval_strategy={getattr(training.eval_strategy, 'value', '?')}, "
                f"eval_on_start={training.eval_on_start}) but {where} has no '{test_split}' split "
                f"(splits: {sorted(splits)}); set 'eval_dataset_name', 'dataset_test_split' or 'test_split_size'"
            )
    return train, evaluation

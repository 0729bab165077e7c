"""Recipe data loading: local JSON/JSONL/Parquet/CSV, directories, mixtures, in-memory datasets, column checks."""

from __future__ import annotations

import pytest
from datasets import Dataset, DatasetDict

from boft_plugin.recipes import RecipeError, load_recipe_data, parse_recipe
from boft_plugin.recipes.data import check_columns, is_conversational_dataset
from boft_plugin.recipes.model_source import check_tokenizer, load_tokenizer, model_config_of
from boft_plugin.testing.recipes import tiny_recipe, write_tiny_data
from boft_plugin.toy.tasks import preference_examples, sft_examples

pytestmark = pytest.mark.timeout(120)


def recipe_for(task, tmp_path, **overrides):
    data = write_tiny_data(tmp_path / "data", n_sft=16, n_dpo=8)
    return parse_recipe(task, config=tiny_recipe(task, tmp_path / "out", data, **overrides))


@pytest.mark.parametrize("fmt", ["jsonl", "json", "parquet", "csv"])
def test_local_files(tmp_path, fmt):
    rows = sft_examples(12, fmt="text")
    path = tmp_path / f"train.{fmt}"
    dataset = Dataset.from_list(rows)
    {"jsonl": dataset.to_json, "json": dataset.to_json, "parquet": dataset.to_parquet, "csv": dataset.to_csv}[fmt](
        str(path)
    )
    recipe = recipe_for(
        "sft", tmp_path, dataset_name=str(path), eval_dataset_name=None, eval_strategy="no", eval_on_start=False
    )
    train, evaluation = load_recipe_data(recipe)
    assert len(train) == 12 and train.column_names == ["text"] and evaluation is None


def test_conversational_messages_and_preferences(tmp_path):
    sft = Dataset.from_list(sft_examples(8, fmt="messages"))
    recipe = recipe_for("sft", tmp_path)
    train, evaluation = load_recipe_data(recipe, train_dataset=sft, eval_dataset=sft)
    assert is_conversational_dataset(train) and len(evaluation) == 8
    pairs = Dataset.from_list(preference_examples(8))
    recipe = recipe_for("dpo", tmp_path, boft_block_size=4)
    train, _ = load_recipe_data(recipe, train_dataset=pairs, eval_dataset=pairs)
    assert is_conversational_dataset(train)
    check_columns(Dataset.from_list([{"chosen": "a", "rejected": "b"}]), "dpo", "implicit prompt")  # accepted


def test_in_memory_dataset_dict_and_test_split(tmp_path):
    splits = DatasetDict(
        {
            "train": Dataset.from_list(sft_examples(8, fmt="text")),
            "test": Dataset.from_list(sft_examples(4, fmt="text")),
        }
    )
    recipe = recipe_for("sft", tmp_path, eval_dataset_name=None)
    train, evaluation = load_recipe_data(recipe, train_dataset=splits)
    assert (len(train), len(evaluation)) == (8, 4)
    recipe = recipe_for("sft", tmp_path, eval_dataset_name=None)
    with pytest.raises(RecipeError, match="no 'test' split"):
        load_recipe_data(recipe, train_dataset=splits["train"])
    recipe = recipe_for("sft", tmp_path, eval_dataset_name=None, test_split_size=0.25)
    train, evaluation = load_recipe_data(recipe, train_dataset=splits["train"])
    assert (len(train), len(evaluation)) == (6, 2)


def test_trl_mixture_with_local_files(tmp_path):
    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    Dataset.from_list(sft_examples(6, fmt="text")).to_json(str(a))
    Dataset.from_list(sft_examples(4, seed=3, fmt="text")).to_json(str(b))
    recipe = recipe_for(
        "sft",
        tmp_path,
        dataset_name=None,
        eval_dataset_name=None,
        datasets=[{"path": str(a)}, {"path": "json", "data_files": str(b)}],
        test_split_size=0.2,
    )
    train, evaluation = load_recipe_data(recipe)
    assert len(train) + len(evaluation) == 10
    recipe = recipe_for("sft", tmp_path, dataset_name=None, datasets=[{"path": "json", "data_files": "missing.jsonl"}])
    with pytest.raises(RecipeError, match=r"datasets\[0\].data_files.*missing.jsonl"):
        load_recipe_data(recipe)
    with pytest.raises(RecipeError, match="unknown key"):
        parse_recipe("sft", config={"datasets": [{"path": str(a), "colums": ["text"]}]})


def test_column_errors_name_the_columns(tmp_path):
    bad = Dataset.from_list([{"question": "q", "answer": "a"}])
    with pytest.raises(RecipeError, match=r"columns \['question', 'answer'\] found; SFT expects"):
        check_columns(bad, "sft", "my data")
    with pytest.raises(RecipeError, match="'chosen'"):
        check_columns(bad, "dpo", "my data")
    with pytest.raises(RecipeError, match="empty"):
        check_columns(Dataset.from_list([{"text": "x"}]).select([]), "sft", "my data")


def test_no_data_and_no_chat_template(tmp_path):
    recipe = recipe_for("sft", tmp_path, dataset_name=None)
    with pytest.raises(RecipeError, match="no training data"):
        load_recipe_data(recipe)
    recipe = recipe_for("sft", tmp_path)
    tokenizer = load_tokenizer(recipe)
    tokenizer.chat_template = None
    with pytest.raises(RecipeError, match="no chat template"):
        check_tokenizer(tokenizer, model_config_of(recipe), conversational=True, recipe=recipe)

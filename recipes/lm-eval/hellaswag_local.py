"""HellaSwag's query and choices as lm-evaluation-harness builds them: the activity label and both context parts
joined, and the WikiHow markup ("[title]", "[step]", ...) taken out of the query and of every ending."""

import re


def clean(text: str) -> str:
    text = text.strip().replace(" [title]", ". ")
    return re.sub(r"\[.*?\]", "", text).replace("  ", " ")


def prepare(dataset):
    def fields(doc: dict) -> dict:
        context = doc["ctx_a"] + " " + doc["ctx_b"].capitalize()
        return {
            "query": clean(doc["activity_label"] + ": " + context),
            "choices": [clean(ending) for ending in doc["endings"]],
            "gold": int(doc["label"]),
        }

    return dataset.map(fields)

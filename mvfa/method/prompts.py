"""The prompt ensemble of METHOD.md section 3: state words, sentence templates, object words."""
from __future__ import annotations

# Object word of each benchmark dataset (the release's REAL_NAME).
REAL_NAME: dict[str, str] = {
    "Brain": "Brain",
    "Liver": "Liver",
    "Retina_RESC": "retinal OCT",
    "Retina_OCT2017": "retinal OCT",
    "Chest": "Chest X-ray film",
    "Histopathology": "histopathological image",
}

NORMAL_STATES: tuple[str, ...] = (
    "{}",
    "flawless {}",
    "perfect {}",
    "unblemished {}",
    "{} without flaw",
    "{} without defect",
    "{} without damage",
)

ABNORMAL_STATES: tuple[str, ...] = (
    "damaged {}",
    "broken {}",
    "{} with flaw",
    "{} with defect",
    "{} with damage",
)

TEMPLATES: tuple[str, ...] = (
    "a bad photo of a {}.",
    "a low resolution photo of the {}.",
    "a bad photo of the {}.",
    "a cropped photo of the {}.",
    "a bright photo of a {}.",
    "a dark photo of the {}.",
    "a photo of my {}.",
    "a photo of the cool {}.",
    "a close-up photo of a {}.",
    "a black and white photo of the {}.",
    "a bright photo of the {}.",
    "a cropped photo of a {}.",
    "a jpeg corrupted photo of a {}.",
    "a blurry photo of the {}.",
    "a photo of the {}.",
    "a good photo of the {}.",
    "a photo of one {}.",
    "a close-up photo of the {}.",
    "a photo of a {}.",
    "a low resolution photo of a {}.",
    "a photo of a large {}.",
    "a blurry photo of a {}.",
    "a jpeg corrupted photo of the {}.",
    "a good photo of a {}.",
    "a photo of the small {}.",
    "a photo of the large {}.",
    "a black and white photo of a {}.",
    "a dark photo of a {}.",
    "a photo of a cool {}.",
    "a photo of a small {}.",
    "there is a {} in the scene.",
    "there is the {} in the scene.",
    "this is a {} in the scene.",
    "this is the {} in the scene.",
    "this is one {} in the scene.",
)


def state_sentences(object_word: str, states: tuple[str, ...]) -> list[str]:
    """Every (state, template) sentence for one object word, states outermost."""
    return [template.format(state.format(object_word)) for state in states for template in TEMPLATES]


def object_word(dataset_name: str, prompt_name: str | None = None) -> str:
    """The word the prompts use: `prompt_name` when given, else the registry's word for a benchmark name."""
    if prompt_name:
        return prompt_name
    if dataset_name in REAL_NAME:
        return REAL_NAME[dataset_name]
    raise KeyError(
        f"no object word for dataset {dataset_name!r}: pass --prompt_name (e.g. --prompt_name 'knee MRI'); "
        f"registered names: {', '.join(REAL_NAME)}"
    )

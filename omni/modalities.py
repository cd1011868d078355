"""The media kinds omni reads: their names, chat placeholders and file extensions, defined once.

Import-free, so every layer can use it and `omni export` ships it as remote code. The sample
format that uses them is in docs/data_format.md.
"""
MODALITIES = ("image", "video", "audio")
PLACEHOLDERS = {m: f"<{m}>" for m in MODALITIES}  # the k-th placeholder of a kind binds to its k-th medium
EXTENSIONS = {  # WebDataset member extensions of each kind
    "image": ("jpg", "jpeg", "png", "webp"),
    "video": ("mp4", "webm"),
    "audio": ("wav", "flac", "mp3"),
}
# A sample's spoken answer (the assistant reply as audio, docs/data_format.md): a member of its own,
# never one of the sample's input media, so stages that do not speak never see it.
SPOKEN_ANSWER = "answer.wav"


def input_member(key: str) -> tuple[str, int] | None:
    """(modality, index) of a sample member that is an input medium: `0.jpg`, `1.wav`, a bare `mp4`
    (index 0); None for every other member, the spoken answer included. The one rule for what a
    sample feeds the model, used by the loader, the records and the curation verbs."""
    if key == SPOKEN_ANSWER:
        return None
    stem, _, ext = key.rpartition(".") if "." in key else ("", "", key)
    for modality, exts in EXTENSIONS.items():
        if ext.lower() in exts:
            return modality, int(stem) if stem.isdigit() else 0
    return None

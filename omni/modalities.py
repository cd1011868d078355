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

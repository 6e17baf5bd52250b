"""Make nwave_param/demo/data/japanese_vowels.pt from the JapaneseVowels files that the aeon wheel ships.

    pip download aeon==1.6.0 --no-deps -d /tmp/aeon && python scripts/japanese_vowels.py /tmp/aeon/aeon-1.6.0-py3-none-any.whl

The data: UCI's Japanese Vowels (M. Kudo, J. Toyama and M. Shimbo, "Multidimensional Curve
Classification Using Passing-Through Regions", Pattern Recognition Letters 20 (11-13), 1103-1111,
1999; https://doi.org/10.24432/C5NS47; CC BY 4.0): nine male speakers saying the vowels /ae/,
each utterance 7 to 29 frames of 12 LPC cepstral coefficients; 270 training utterances (30 per
speaker) and 370 test ones; the class is the speaker.  The file holds, per split, every frame
in order (float32, ``(frames, 12)``), each utterance's length and its speaker (0-8): tensors only,
read with ``torch.load(..., weights_only=True)``.
"""

import io
import sys
import zipfile

import torch

MEMBERS = {
    "train": "aeon/datasets/data/JapaneseVowels/JapaneseVowels_TRAIN.ts",
    "test": "aeon/datasets/data/JapaneseVowels/JapaneseVowels_TEST.ts",
}


def read_ts(text: str) -> tuple[list[torch.Tensor], list[int]]:
    """The series and labels of a .ts file: after @data, a line per case, its dims separated by
    ':' (each a comma list over time), the label last."""
    series, labels = [], []
    lines = iter(text.splitlines())
    for line in lines:
        if line.strip().lower() == "@data":
            break
    for line in lines:
        if not line.strip():
            continue
        *dims, label = line.strip().split(":")
        series.append(torch.tensor([[float(v) for v in dim.split(",")] for dim in dims]).T)  # (frames, 12)
        labels.append(int(label) - 1)
    return series, labels


def main(wheel: str, out: str = "nwave_param/demo/data/japanese_vowels.pt") -> None:
    data = {}
    with zipfile.ZipFile(wheel) as archive:
        for split, member in MEMBERS.items():
            series, labels = read_ts(archive.read(member).decode())
            data[split] = {
                "frames": torch.cat(series).to(torch.float32),
                "lengths": torch.tensor([s.shape[0] for s in series]),
                "labels": torch.tensor(labels),
            }
    buffer = io.BytesIO()
    torch.save(data, buffer)
    with open(out, "wb") as stream:
        stream.write(buffer.getvalue())
    print(out, len(buffer.getvalue()), "bytes", {k: (v["lengths"].numel(), int(v["lengths"].sum())) for k, v in data.items()})


if __name__ == "__main__":
    main(*sys.argv[1:])

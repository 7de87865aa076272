"""A damaged or planted data file is one line naming it (exit 2, no run dir left), and is never run as code."""

from __future__ import annotations

import pickle
from pathlib import Path

import pytest

from genrun.errors import DataCorrupt
from genrun.tasks import vision
from genrun.tasks.detection import PennFudan
from genrun.tasks.nlg import read_e2e
from genrun.tasks.nlu import GLUE, read_glue
from test_detection import write_penn_fudan
from test_nlu import write_glue
from test_vision_data import SIZE, write_cifar10, write_svhn


class _Planted:
    """What a malicious batch file holds: unpickling calls `open(marker, "w")`, plain pickle would create it."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return open, (str(self.marker), "w")


def test_a_planted_cifar_batch_is_refused_and_not_run(tmp_path):
    write_cifar10(tmp_path)
    marker, batch = tmp_path / "code-ran", tmp_path / "cifar-10-batches-py" / "data_batch_3"
    with open(batch, "wb") as f:
        pickle.dump({"data": _Planted(marker), "labels": [0, 1]}, f)
    with pytest.raises(DataCorrupt) as err:
        vision.Cifar10(data_dir=str(tmp_path), image_size=SIZE).datasets()
    why = "it names io.open, which no data file needs; refused, not run"
    assert f"{batch} is not a readable data pickle ({why})" in str(err.value)
    assert not marker.exists()


@pytest.mark.parametrize("damage", ["truncated", "not a batch"])
def test_a_damaged_cifar_batch_is_one_line_naming_it(tmp_path, damage):
    write_cifar10(tmp_path)
    batch = tmp_path / "cifar-10-batches-py" / "test_batch"
    if damage == "truncated":
        batch.write_bytes(batch.read_bytes()[:100])
    else:
        batch.write_bytes(pickle.dumps({"data": [1, 2, 3]}))
    with pytest.raises(DataCorrupt) as err:
        vision.Cifar10(data_dir=str(tmp_path), image_size=SIZE).datasets()
    assert str(batch) in str(err.value) and "\n" not in str(err.value)


def test_a_damaged_svhn_file_is_one_line_naming_it(tmp_path):
    write_svhn(tmp_path)
    (tmp_path / "test_32x32.mat").write_bytes(b"MATLAB 5.0 MAT-file, but cut off")
    with pytest.raises(DataCorrupt, match=f"{tmp_path / 'test_32x32.mat'} is not a readable SVHN .mat file"):
        vision.Svhn(data_dir=str(tmp_path), image_size=SIZE).datasets()


def test_a_damaged_data_file_through_the_cli_is_one_line_and_leaves_no_run(genrun, tmp_path):
    write_cifar10(tmp_path / "data")
    batch = tmp_path / "data" / "cifar-10-batches-py" / "data_batch_1"
    batch.write_bytes(batch.read_bytes()[:50])
    proc = genrun("task=cifar10", f"task.data_dir={tmp_path / 'data'}", "+experiment=fast", "trainer.progress=off")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines() == [
        f"genrun: error: task.data_dir: {batch} is not a readable data pickle (pickle data was truncated); extract "
        "the data set's archive again"]
    assert not (tmp_path / "outputs").exists()


def test_a_damaged_image_is_one_line_naming_it(tmp_path):
    folder = write_penn_fudan(tmp_path)
    (folder / "PedMasks" / "FudanPed00003_mask.png").write_bytes(b"\x89PNG cut off")
    with pytest.raises(DataCorrupt, match=r"FudanPed00003_mask.png is not a readable image \("):
        PennFudan(str(tmp_path), test_size=1).datasets()


def test_a_glue_file_that_is_not_text_is_one_line_naming_it(tmp_path):
    path = write_glue(tmp_path, "rte") / "dev.tsv"
    path.write_bytes(b"index\tsentence1\tsentence2\tlabel\n0\t\xff\xfe\x00binary\tx\tentailment\n")
    with pytest.raises(DataCorrupt, match=rf"{path}: not a readable GLUE file \("):
        read_glue(path, GLUE["rte"])



def test_an_e2e_file_that_is_not_text_is_one_line_naming_it(tmp_path):
    path = tmp_path / "devset.csv"
    path.write_bytes(b"mr,ref\nname[The Eagle],\xff\xfe not text\n")
    with pytest.raises(DataCorrupt, match=rf"{path}: not a readable E2E CSV file \("):
        read_e2e(path)

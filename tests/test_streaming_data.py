"""SubsetStreamingDataset in one process: the ids of a pass, the resume offset, the refusals."""
from __future__ import annotations

import numpy as np
import pytest
from streaming import MDSWriter
from torch.utils.data import DataLoader

from attent_scale.streaming_data import SubsetStreamingDataset, clean_shared_memory


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("mds")
    # Small shards so a selection spans several of them; sample i holds the value i.
    with MDSWriter(out=str(root), columns={"tokens": "ndarray:int32"}, size_limit=1 << 10) as w:
        for i in range(200):
            w.write({"tokens": np.full(8, i, np.int32)})
    clean_shared_memory()
    ds = SubsetStreamingDataset(local=str(root), batch_size=4, shuffle_seed=1)
    assert ds.num_shards > 3 and ds.full_size == 200
    return ds


def ids_of(ds) -> list[int]:
    out = []
    for batch in DataLoader(ds, batch_size=4):
        assert (batch["tokens"][:, 0] == batch["id"]).all()  # "id" is the real sample index
        out += batch["id"].tolist()
    return out


def test_a_pass_yields_exactly_the_selection_shuffled(dataset):
    ids = np.arange(0, 200, 3)[:64]
    dataset.set_pass(0, ids)
    got = ids_of(dataset)
    assert sorted(got) == ids.tolist() and got != ids.tolist()
    dataset.set_pass(1, ids)
    again = ids_of(dataset)
    assert sorted(again) == ids.tolist() and again != got  # each pass reshuffles


def test_resume_mid_pass_continues_with_the_same_order(dataset):
    ids = np.arange(100, 196)
    dataset.set_pass(2, ids)
    full = ids_of(dataset)
    dataset.set_pass(2, ids, samples_done=20)
    assert ids_of(dataset) == full[20:]


def test_selection_must_be_whole_global_batches_of_known_ids(dataset):
    with pytest.raises(ValueError, match="multiple of the global batch 4"):
        dataset.set_pass(3, np.arange(10))
    with pytest.raises(ValueError, match=r"\[0, 200\)"):
        dataset.set_pass(3, np.array([0, 1, 2, 200]))
    with pytest.raises(ValueError, match="samples_done"):
        dataset.set_pass(3, np.arange(8), samples_done=12)

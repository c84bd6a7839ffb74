"""`make figures` regenerates vis/ from runs: the same code on the tiny model, into a temp
folder."""
from course_lib.lab import figures


def test_figures_are_drawn_from_runs(tmp_path):
    paths = figures.chapter01(tmp_path, model_name="tiny", repeat=1)
    paths += figures.chapter04(tmp_path, model_name="tiny", n=4, max_batch=2, max_new_tokens=4)
    assert [p.name for p in paths] == ["step_time_vs_batch.png", "roofline.png",
                                       "batching_comparison.svg"]
    for p in paths:
        assert p.exists() and p.stat().st_size > 5000
    svg = (tmp_path / "batching_comparison.svg").read_text()
    assert "static batching" in svg and "continuous batching" in svg


def test_the_ladder_figure_is_drawn_from_the_stored_gpu_run(tmp_path):
    (path,) = figures.chapter09(tmp_path)
    svg = path.read_text()
    assert path.name == "ladder_vs_floor.svg" and "physical floor" in svg and "hf-cb" in svg

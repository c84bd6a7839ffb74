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


def test_the_block_pictures_mark_what_they_say():
    import matplotlib
    matplotlib.use("Agg")
    from course_lib.lab import plots
    # a is preempted after step 1 and back at step 3; b never leaves; c finishes
    # and c is preempted and recomputed within step 2 (its table starts elsewhere)
    trace = [{"a": [0], "b": [1], "c": [2, 5]}, {"a": [0, 3], "b": [1], "c": [2, 5]},
             {"b": [1], "c": [6]}, {"a": [4], "b": [1, 0], "c": [6, 2]}]
    assert plots.preemptions_in(trace) == [(2, "c"), (2, "a")]
    ax = plots.block_map(trace, 7, follow="a")
    assert [line.get_color() for line in ax.lines] == ["black", "#d62728"]
    ax = plots.block_tables({"x": [7, 8, 2], "y": [7, 8, 5], "z": [3]})
    shared = {p.get_facecolor() for p in ax.patches[:2]}
    assert len(ax.patches) == 7 and len(shared) == 2 and ax.patches[2].get_facecolor() not in shared
    ax = plots.memory_map({"one": {"weights": 2e9, "KV-cache": 1e9}}, capacity=4e9)
    assert [round(p.get_width(), 3) for p in ax.patches] == [2.0, 1.0]

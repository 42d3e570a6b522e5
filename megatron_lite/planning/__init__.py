"""Planning before a run: parameter and FLOP counts, scaling laws, training time, per-GPU memory and a search over
layouts, answered from configs and closed forms; which layouts can run is asked of ``megatron_lite.rules``, never of
the engines or the trainer."""

"""etrn_dequeue plugin."""

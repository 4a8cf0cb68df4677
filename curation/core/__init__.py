"""The bottom layer: no model, no stage; everything else in curate may import it."""

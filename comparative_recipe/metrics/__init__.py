"""Task metrics beyond the loss: generative QA scores (``qa``) and the greedy generation that
produces the answers they score (``generation``)."""

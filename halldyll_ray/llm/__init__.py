"""Language models behind the background memory jobs (issue #14): protocol and clients."""

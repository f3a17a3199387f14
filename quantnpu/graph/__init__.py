"""What every pass, the quantizer and the tools share about a graph: the records kept on nodes
(`meta`), op sets and walkers (`ops`), and the stable printed form used by graph-diff tests (`text`)."""

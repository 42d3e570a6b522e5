"""Values several layers must agree on, kept here so that none imports another only to read one."""

IGNORE_INDEX = -100  # a label that counts towards no loss (padding, the prompt of a seq2seq pair)

"""balloonctl, the command line: the top of the stack. It reads and changes a running hostd
through hostd's public client, and mounts the lab's, the experiments' and the test tool's
subcommands; nothing below imports it."""

using Vmsnap.Cli;
using Vmsnap.Cli.Commands;

// One line per group of commands: each group's Build() yields its commands.
var root = Cli.Root(
    "vmsnap: save and load virtual-machine state as qcow2 internal snapshots, in QEMU's own formats.",
    ImageCommands.Build(),
    SnapshotCommands.Build(),
    VmCommands.Build(),
    [DemoCommand.Build()]);
return Cli.Invoke(root, args);

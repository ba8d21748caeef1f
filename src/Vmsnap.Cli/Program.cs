using System.CommandLine;
using Vmsnap.Cli;
using Vmsnap.Cli.Commands;

var root = new RootCommand("vmsnap: save and load virtual-machine state as qcow2 internal snapshots, in QEMU's own formats.");
foreach (var command in ImageCommands.Build()) root.Subcommands.Add(command);
foreach (var command in SnapshotCommands.Build()) root.Subcommands.Add(command);
foreach (var command in VmCommands.Build()) root.Subcommands.Add(command);
foreach (var command in LiveCommands.Build()) root.Subcommands.Add(command);
root.Subcommands.Add(DemoCommand.Build());
return Cli.Invoke(root, args);

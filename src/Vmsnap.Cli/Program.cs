using System.CommandLine;
using Vmsnap.Cli;
using Vmsnap.Cli.Commands;

return Cli.Invoke(VmsnapCommand.Create(), args);

namespace Vmsnap.Cli
{
    /// <summary>The vmsnap command: every group of commands under one root.</summary>
    internal static class VmsnapCommand
    {
        /// <summary>One line per group of commands: each group's Build() yields its commands.</summary>
        internal static RootCommand Create() => Cli.Root(
            "vmsnap: save and load virtual-machine state as qcow2 internal snapshots, in QEMU's own formats.",
            ImageCommands.Build(),
            SnapshotCommands.Build(),
            VmCommands.Build(),
            LiveCommands.Build(),
            [DemoCommand.Build()]);
    }
}

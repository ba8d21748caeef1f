using System.CommandLine;
using Vmsnap.Cli;
using Vmsnap.Cli.Commands;

return Cli.Invoke(VmsnapCommand.Create(args), args);

namespace Vmsnap.Cli
{
    /// <summary>The vmsnap command: every group of commands under one root.</summary>
    internal static class VmsnapCommand
    {
        /// <summary>
        /// The root command for <paramref name="args"/> (every command when null). One line per group of commands:
        /// each group's Build() names its commands and how to build them.
        /// </summary>
        internal static RootCommand Create(string[]? args = null) => Cli.Root(
            "vmsnap: save and load virtual-machine state as qcow2 internal snapshots, in QEMU's own formats.",
            args,
            ImageCommands.Build(),
            SnapshotCommands.Build(),
            VmCommands.Build(),
            LiveCommands.Build(),
            [DemoCommand.Build()]);
    }
}

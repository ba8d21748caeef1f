using System.CommandLine;

namespace Vmsnap.Cli.Commands;

internal static class SnapshotCommands
{
    internal static IEnumerable<Command> Build()
    {
        yield break;
    }
}

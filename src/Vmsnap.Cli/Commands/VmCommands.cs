using System.CommandLine;

namespace Vmsnap.Cli.Commands;

internal static class VmCommands
{
    internal static IEnumerable<Command> Build()
    {
        yield break;
    }
}
